"""benchmarks/sparse_decode_attend.py: SDPA against `attend` at the sparse decoders' decode shapes."""

from __future__ import annotations

from .conftest import load_benchmark


def test_attend_benchmark_times_both_paths_on_the_same_inputs() -> None:
    bench = load_benchmark("sparse_decode_attend")
    rows = bench.measure(5, n=256, kv=2, heads=6, d=8, budgets=(16, 32))
    assert [(r["dtype"], r["keys"], r["index_rows"]) for r in rows] == [
        (dtype, m, g) for dtype in ("float32", "bfloat16") for m in (16, 32) for g in (2, 6)
    ]
    for r in rows:
        assert r["sdpa_ms"]["n"] == r["attend_ms"]["n"] == 5 and r["sdpa_ms"]["median"] > 0
        # The same attention: exact where attend calls SDPA itself, to bf16 rounding otherwise.
        assert r["max_abs_diff"] <= (0.0 if r["dtype"] == "float32" or r["index_rows"] == 2 else 3e-2)
    table = bench.render({"rows": rows})
    assert table.count("\n") == len(rows) + 1 and "| bfloat16 | 32 | 6 |" in table
