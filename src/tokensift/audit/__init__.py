"""Tokenizer audit: crosslingual token premiums, linguistic purity and the vocabulary-size experiment.

Based on Arnett et al., "Explaining and Mitigating Crosslingual Tokenizer Inequities" (arXiv 2510.21909)
and Bayram et al., "Tokenization Standards for Linguistic Integrity: Turkish as a Benchmark"
(arXiv 2502.07057). Everything runs offline on corpora shipped in `tokensift/audit/data/`.
"""

from tokensift.audit.audit import DEFAULT_PURITY, DEFAULT_TOKENIZERS, AuditResult, audit_tokenizers
from tokensift.audit.corpus import Language, ParallelCorpus, load_udhr
from tokensift.audit.premiums import Counts, PremiumRow, token_premiums
from tokensift.audit.purity import Lexicon, PurityRow, purity
from tokensift.audit.tokenizer import AuditTokenizer, from_tiktoken, from_tokenizers, load_audit_tokenizer
from tokensift.audit.vocab import VocabRow, load_bible, vocab_experiment

__all__ = [
    "DEFAULT_PURITY",
    "DEFAULT_TOKENIZERS",
    "AuditResult",
    "AuditTokenizer",
    "Counts",
    "Language",
    "Lexicon",
    "ParallelCorpus",
    "PremiumRow",
    "PurityRow",
    "VocabRow",
    "audit_tokenizers",
    "from_tiktoken",
    "from_tokenizers",
    "load_audit_tokenizer",
    "load_bible",
    "load_udhr",
    "purity",
    "token_premiums",
    "vocab_experiment",
]
