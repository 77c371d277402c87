"""The README's bench tables are the ones printed from the committed raw results (issue 12, part 7):
a hand edit of a figure, or a results file replaced without regenerating the README, fails here."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

from .conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _printed(argv: list[str], main) -> str:
    buf = io.StringIO()
    old = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            main()
    finally:
        sys.argv = old
    return buf.getvalue()


def _readme() -> str:
    return (ROOT / "README.md").read_text()


@pytest.mark.parametrize(("table", "folder"), [("demo", "demo"), ("ruler-lite", "ruler_lite")])
def test_bench_table_in_readme_is_the_committed_results(table: str, folder: str) -> None:
    directory = RESULTS / folder
    if not (directory / "results.jsonl").is_file():
        pytest.fail(f"{directory}/results.jsonl is not committed: the README's {table} table has no source")
    tables = load_benchmark("readme_tables")
    printed = _printed(["readme_tables.py", table, str(directory)], tables.main).strip()
    assert printed.count("\n") >= 3, printed
    assert printed in _readme(), f"README's {table} table differs from readme_tables.py's output:\n{printed}"


def test_eviction_tables_in_readme_are_the_committed_results() -> None:
    eviction = load_benchmark("eviction")
    saved = json.loads((RESULTS / "eviction.json").read_text())
    assert set(saved["cost"]) == {"query-aware", "query-agnostic"}, "cost cells per protocol"
    out = _printed(["eviction.py", "--render", str(RESULTS / "eviction.json")], eviction.main)
    agnostic = out.split("### query-agnostic")[1].strip()
    # Every query-agnostic cost cell is measured (no "-" left in the cost columns).
    for line in agnostic.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[5] != "-" and cells[6] != "-", line
    readme = _readme()
    assert agnostic in readme
    # The query-aware table's rows (the README's header names the single run, so compare rows).
    aware = out.split("### query-aware")[1].split("###")[0].strip().splitlines()[2:]
    for row in aware:
        assert row.replace(" (1 run)", "") in readme, row


@pytest.mark.parametrize("folder", ["leaderboard", "leaderboard_sparse"])
def test_leaderboard_tables_in_readme_are_the_committed_results(folder: str) -> None:
    """Each leaderboard row in the README is the one the report prints from the committed rows (the
    README's header names the table, so compare rows)."""
    from tokensift.bench.report import leaderboard_markdown, leaderboard_tables, scored
    from tokensift.bench.results import read_rows

    tables = leaderboard_tables(scored(read_rows(RESULTS / folder / "results.jsonl")))
    assert tables, f"{folder}: no leaderboard table in the committed rows"
    readme = _readme()
    for table in tables:
        rows = leaderboard_markdown(table).splitlines()[2:]
        assert len(rows) >= 2, rows
        for row in rows:
            assert row in readme, f"{folder} {table['protocol']}: README lacks {row}"


def test_kvpress_side_by_side_rows_in_readme_are_the_committed_results() -> None:
    """Every row of the README's 4k kvpress side-by-side table is the row `readme_rows` renders from the
    committed raw rows (bold aside), and every cell both libraries finished has its row."""
    sbs = load_benchmark("kvpress_side_by_side")
    rows = json.loads((RESULTS / "kvpress_side_by_side_4k.json").read_text())["rows"]
    rendered = sbs.readme_rows(sbs.summarise(rows), sbs.paired(rows))
    header = "| press (ratio 0.75 unless stated) | protocol | tokensift | kvpress 0.5.5 |"
    section = _readme().split(header, 1)[1].split("\n\n", 1)[0]
    in_readme = [line.replace("**", "") for line in section.splitlines()[2:]]
    assert len(rendered) >= 20, rendered
    differing = "\n".join(sorted(set(in_readme) ^ set(rendered)))
    assert sorted(in_readme) == sorted(rendered), f"README's kvpress rows differ from the rows:\n{differing}"


PREFILL_HEADER = (
    "| spec | prefill s | vs dense | attention s | attention vs dense | pairs computed | passkey found |"
)


@pytest.mark.parametrize(
    ("results", "lengths"), [("long_context_32k_prefill.json", 1), ("long_context_8k16k_prefill.json", 2)]
)
def test_long_context_prefill_rows_in_readme_are_the_committed_results(results: str, lengths: int) -> None:
    """Each spec's line of the README's long-context sparse-prefill tables carries the committed
    run's speed-up, attention speed-up, pairs computed and passkeys found, as the benchmark formats
    them; a table of several lengths starts each line with the context."""
    lc = load_benchmark("long_context")
    doc = json.loads((RESULTS / results).read_text())
    header = "\n" + (PREFILL_HEADER if lengths == 1 else "| context " + PREFILL_HEADER)
    table = _readme().split(header, 1)[1].split("\n\n", 1)[0].replace("**", "")
    rows = [r for r in doc["rows"] if r["part"] == "prefill" and "skipped" not in r]
    assert len(rows) == 4 * lengths and len(doc["runs"]) == 20 * lengths
    for row in rows:
        name = "dense" if row["spec"] == "dense" else f"`{row['spec']}`"
        start = f"| {name} |" if lengths == 1 else f"| {row['length']} | {name} |"
        line = next(x for x in table.splitlines() if x.startswith(start))
        cells = [f"{row['pairs_computed']:.3f}", lc.found(row)]
        if row["spec"] != "dense":
            cells += [lc.fmt(row["prefill_vs_dense"], "x"), lc.fmt(row["attention_vs_dense"], "x")]
        for cell in cells:
            assert f" {cell} " in line, (row["spec"], cell, line)


@pytest.mark.parametrize(
    ("results", "dtype", "count"),
    [
        ("long_context_8k16k_eviction.json", "float32", 14),
        ("long_context_8k16k_eviction_bf16.json", "bfloat16", 14),
        ("long_context_32k_eviction_bf16.json", "bfloat16", 7),
        ("long_context_8k_prefill_bf16.json", "bfloat16", 4),
        ("long_context_16k_prefill_bf16.json", "bfloat16", 4),
        ("long_context_32k_prefill_bf16.json", "bfloat16", 4),
        ("long_context_8k_decode_dtypes.json", "float32", 5),
        ("long_context_8k_decode_dtypes.json", "bfloat16", 5),
        ("long_context_8k16k_decode_bf16.json", "bfloat16", 26),
        ("long_context_32k_decode_bf16_budgets.json", "bfloat16", 13),
        ("long_context_tidaldecode_bf16.json", "bfloat16", 8),
    ],
)
def test_long_context_rendered_rows_in_readme_are_the_committed_results(
    results: str, dtype: str, count: int
) -> None:
    """The README's 8k/16k eviction, bf16 prefill and bf16 decode tables are the committed
    runs', rendered by the benchmark (`long_context.py --render`)."""
    lc = load_benchmark("long_context")
    doc = json.loads((RESULTS / results).read_text())
    rows = [line for line in lc.render(doc).splitlines() if line.startswith(f"| {dtype} |")]
    assert len(rows) == count, rows
    readme = _readme()
    for line in rows:
        assert line in readme, line


def test_sparse_prefill_profile_table_in_readme_is_the_committed_profile() -> None:
    """The README's 16k profile of the sparse-prefill methods is `sparse_prefill_profile.py --render`
    of the committed results."""
    profile = load_benchmark("sparse_prefill_profile")
    doc = json.loads((RESULTS / "sparse_prefill_profile_16k.json").read_text())
    assert len(doc["rows"]) == 3
    assert profile.render(doc) in _readme()
