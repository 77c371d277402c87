"""Context parallelism: exact attention with the sequence split across processes (torch.distributed).

`generate_context_parallel` runs one generation with its prompt split over the ranks of a process
group that torchrun starts (gloo on CPU, NCCL on GPU): `ring` or `tokenring` schedules for the
prefill, a split or gathered KV cache for decoding, SnapKV eviction against a global budget.
"""

from tokensift.distributed.generate import generate_context_parallel
from tokensift.distributed.schedules import SCHEDULES, ring_attention, tokenring_attention

__all__ = ["SCHEDULES", "generate_context_parallel", "ring_attention", "tokenring_attention"]
