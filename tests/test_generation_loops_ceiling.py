"""The generation-loops benchmark's ceiling (issue 16): the most any model-free drafter could run over
transformers' prompt lookup, from the tokens no draft copied from the context could hold."""

from __future__ import annotations

import pytest

import tokensift
from tokensift.speculative import clear_global_caches

from .conftest import load_benchmark, loop_row, prompt_ids, tiny_model

bench = load_benchmark("generation_loops")


def test_novel_tokens_are_the_pairs_seen_nowhere_before() -> None:
    # Pairs before the decode: (1,2) (2,3) (3,4) and (4,5) (the prompt's last token, the prefill's).
    assert bench.novel_tokens([1, 2, 3, 4], [5, 3, 4, 9, 3, 4]) == 3  # (5,3), (4,9), (9,3)
    assert bench.novel_tokens([1, 2, 3], [4]) == 0  # the prefill's token is no decode step
    assert bench.novel_tokens([7, 8], [9, 7, 8, 9]) == 1  # (9,7) only: (7,8) and (8,9) were seen
    assert bench.novel_tokens([], [1, 2, 1, 2]) == 2


@pytest.mark.parametrize("method", ["suffix_decoding", "prompt_lookup", "suffix_decoding:tree=true"])
def test_no_model_free_loop_takes_fewer_steps_than_novel_tokens(method: str) -> None:
    model = tiny_model("qwen2")
    ids = prompt_ids(48, seed=4)
    ids = ids + ids[:24] + ids  # copies to draft from
    clear_global_caches()  # as the benchmark does: an earlier response could hold the novel pairs
    out = tokensift.generate(model, ids, method, max_new_tokens=40, ignore_eos=True)
    novel = bench.novel_tokens(ids, out.token_ids)
    steps = out.stats.counters["loop_steps"]
    assert out.stats.counters["accepted_tokens"] > 0  # it drafted and the model took some
    assert novel > 0 and steps >= novel


def test_ceiling_and_the_target_it_rules_out() -> None:
    ids = [1, 2, 3, 4, 5, 6]
    out = [7, 1, 2, 3, 8, 4, 5, 6, 9]  # novel: (7,1), (3,8), (8,4), (6,9); 8 decode tokens
    assert bench.novel_tokens(ids, out) == 4
    lookup = bench.hf_key(5)
    runs = {
        bench.HF_GREEDY: (out, [8.0] * 5),
        bench.OUR_GREEDY: (out, [8.0] * 5),  # 1 token/s
        lookup: (out, [4.0] * 5),  # 2 tokens/s: lookup doubles greedy
        bench.SUFFIX: (out, [3.0] * 5),
    }
    rows = [loop_row(bench, "edit_records", runs, ids)]
    ceiling, novel = bench.copy_ceiling(rows, lambda r: lookup)
    # At least 4 steps of 1 s each: at best 8/4 = 2 tokens/s over lookup's 2: 1.0x.
    assert novel == [4] and ceiling.median == pytest.approx(1.0)
    target = bench.targets(rows)["edit_records"]
    assert target["spread"]["median"] == pytest.approx(4 / 3) and not target["met"]
    assert target["ceiling"]["median"] == pytest.approx(1.0) and not target["reachable"]
    table, markdown = bench.one_model_table("m", rows, [bench.SUFFIX])
    assert table[0]["novel_tokens"] == [4]
    assert "| 4 | 1.00x [1.00-1.00] |" in markdown
    # A copy with no novel token has no finite ceiling.
    rows[0].runs[bench.HF_GREEDY] = bench.Timed()
    rows[0].runs[bench.HF_GREEDY].add([4, 5, 6], 2.0, 1.0)
    assert bench.copy_ceiling(rows, lambda r: lookup) == (None, [0])
