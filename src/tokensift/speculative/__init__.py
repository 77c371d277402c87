"""Generation loops that change which tokens the model must produce itself: model-free drafts
(suffix trees, prompt lookup) verified losslessly, and small/large model pairs (BiLD, routing)."""

from tokensift.speculative.drafting import clear_global_caches
from tokensift.speculative.suffix_tree import Draft, SuffixTree

__all__ = ["Draft", "SuffixTree", "clear_global_caches"]
