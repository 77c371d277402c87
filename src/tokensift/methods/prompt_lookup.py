"""Prompt lookup decoding: draft by copying what followed the last n-gram earlier in the sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokensift.errors import TokensiftError
from tokensift.methods.base import LoopMethod, register
from tokensift.speculative.drafting import NgramDrafter, draft_loop

if TYPE_CHECKING:
    import torch

    from tokensift.runtime.generate import Decoding


@register
@dataclass
class PromptLookup(LoopMethod):
    """Draft the tokens that followed an earlier occurrence of the last n-gram; verify losslessly.

    The last `max_ngram` tokens (then fewer, down to `min_ngram`) are looked up in the prompt and
    the output so far; the `num_tokens` tokens after their earliest occurrence are the draft, which
    the model verifies in one forward exactly as in `suffix_decoding` (greedy: longest agreeing
    prefix plus the model's next token; sampling: the standard rejection rule). The draft length is
    fixed, unlike SuffixDecoding's, so a wrong guess costs a longer forward.

    Based on Saxena, "Prompt Lookup Decoding" (2023), as implemented by transformers'
    `prompt_lookup_num_tokens` (PromptLookupCandidateGenerator).

    Parameters
    ----------
    num_tokens:
        Draft tokens per step (the prompt-lookup blog uses 10).
    max_ngram:
        Longest n-gram matched (transformers default: 2).
    min_ngram:
        Shortest n-gram matched (transformers: 1).
    """

    name = "prompt_lookup"
    paper = "Saxena, Prompt Lookup Decoding, 2023 (transformers' prompt_lookup_num_tokens)"

    num_tokens: int = 10
    max_ngram: int = 2
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise TokensiftError(f"prompt_lookup num_tokens must be >= 1, got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise TokensiftError(
                f"prompt_lookup needs 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}"
            )

    def decode(self, decoding: Decoding, logits: torch.Tensor) -> None:
        draft_loop(decoding, logits, NgramDrafter(self.num_tokens, self.max_ngram, self.min_ngram), self.name)
