"""Generation loops on the real embedded model (smollm2-135m): lossless on the repetitive workloads,
and drafts that actually get accepted where the model copies its input."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks.loop_workloads import WORKLOADS
from tokensift.speculative import clear_global_caches

pytestmark = pytest.mark.slow

NEW = 40


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tokensift.Model]:
    # One thread: as fast as two for this model, and immune to a busy neighbour stalling OpenMP.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tokensift.load("smollm2-135m")
    torch.set_num_threads(threads)


# smollm2 copies the previous answer in self_refine; on the others it mostly writes its own text.
@pytest.mark.parametrize(("workload", "min_per_step"), [("self_refine", 2.0), ("reformat_records", 1.0)])
def test_drafting_is_lossless_on_workloads(
    smollm2: tokensift.Model, workload: str, min_per_step: float
) -> None:
    task = WORKLOADS[workload]()
    sample = task.samples(token_counter(smollm2), 300, 1, seed=0)[0]
    plain = tokensift.generate(smollm2, sample.prompt, None, max_new_tokens=NEW)
    for spec in ["suffix_decoding", "prompt_lookup"]:
        clear_global_caches()
        out = tokensift.generate(smollm2, sample.prompt, spec, max_new_tokens=NEW)
        assert out.token_ids == plain.token_ids, spec
        assert task.score(sample, out.text) == task.score(sample, plain.text)
        c = out.stats.counters
        assert c["loop_tokens_per_step"] >= min_per_step, (spec, c)


def test_snapkv_with_suffix_decoding_is_snapkv(smollm2: tokensift.Model) -> None:
    sample = WORKLOADS["self_refine"]().samples(token_counter(smollm2), 300, 1, seed=1)[0]
    spec = "snapkv:budget=0.5,window_size=16"
    alone = tokensift.generate(smollm2, sample.prompt, spec, max_new_tokens=NEW)
    both = tokensift.generate(smollm2, sample.prompt, spec + "+suffix_decoding", max_new_tokens=NEW)
    assert both.token_ids == alone.token_ids
    assert both.stats.tokens_evicted == alone.stats.tokens_evicted > 0
    assert both.stats.counters["accepted_tokens"] > 0
