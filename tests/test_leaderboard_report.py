"""The compact leaderboard of `tokensift report` (issue 17): a row per method family, a column per
compression ratio, the mean over tasks on the samples every plan of a protocol finished, built from
synthetic rows (no model)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tokensift.bench.report import leaderboard_markdown, leaderboard_tables, plan_compression, write_report

AGNOSTIC = " [query-agnostic]"


def _row(task: str, spec: str, sample: tuple[float | None, int], score: float | None, protocol: str) -> dict:
    depth, index = sample
    kept = 1.0 if spec == "dense" else 0.4
    row = {
        "model": "qwen2.5-coder-0.5b",
        "task": task,
        "metric": "accuracy",
        "method": spec + ("" if protocol == "query-aware" else AGNOSTIC),
        "method_spec": spec,
        "protocol": protocol,
        "prefill_chunk": 0,
        "length": 4096,
        "depth": depth,
        "index": index,
        "seed": 0,
        "score": score,
        "kv_bytes_peak": 100.0 * kept,
        "kv_bytes_dense": 100.0,
        "prefill_seconds": 3.0,
        "decode_seconds": 1.0,
        "decode_tokens_per_second": 5.0,
        "applied": True,
        "notes": [],
    }
    if score is None:
        row["error"] = "refused"
    return row


# Two tasks, two samples each: a depth-swept one (samples are depths) and one without depths.
SAMPLES = {"niah_single_1": [(0.0, 0), (0.5, 0)], "vt": [(None, 0), (None, 1)]}
# Per protocol, per plan, per task: the scores of the two samples.
SCORES = {
    "query-aware": {
        "dense": {"niah_single_1": [1.0, 1.0], "vt": [1.0, 0.0]},
        "snapkv:budget=0.75": {"niah_single_1": [1.0, 0.0], "vt": [1.0, 0.0]},
        "snapkv:budget=0.25": {"niah_single_1": [0.0, 0.0], "vt": [0.0, 0.5]},
        "streaming_llm:budget=0.5": {"niah_single_1": [0.0, 1.0], "vt": [0.0, 0.0]},
        "streaming_llm:budget=0.25": {"niah_single_1": [0.0, 0.0], "vt": [0.0, 0.0]},
        "adaptive(snapkv:budget=0.5)": {"niah_single_1": [1.0, 1.0], "vt": [1.0, 1.0]},
    },
    "query-agnostic": {
        "dense": {"niah_single_1": [1.0, 0.0], "vt": [0.0, 0.0]},
        "snapkv:budget=0.75": {"niah_single_1": [0.0, 0.0], "vt": [0.0, 0.0]},
        "snapkv:budget=0.25": {"niah_single_1": [0.0, 0.0], "vt": [0.0, 0.0]},
    },
}


def leaderboard_rows() -> list[dict]:
    rows = []
    for protocol, plans in SCORES.items():
        for spec, per_task in plans.items():
            for task, scores in per_task.items():
                for sample, score in zip(SAMPLES[task], scores, strict=True):
                    rows.append(_row(task, spec, sample, score, protocol))
    return rows


def unfinished_rows() -> list[dict]:
    """A resume stopped mid-sample: a third vt sample only dense and one evictor have, a third niah
    sample on which snapkv failed, and a task only dense has started."""
    aware = "query-aware"
    return [
        _row("vt", "dense", (None, 2), 1.0, aware),
        _row("vt", "snapkv:budget=0.75", (None, 2), 1.0, aware),
        *(_row("niah_single_1", spec, (1.0, 0), 1.0, aware) for spec in SCORES[aware] if "0.25" not in spec),
        _row("niah_single_1", "snapkv:budget=0.25", (1.0, 0), None, aware),
        _row("cwe", "dense", (None, 0), 1.0, aware),
    ]


def _by_protocol(rows: list[dict]) -> dict[str, dict]:
    tables = leaderboard_tables(rows)
    assert len(tables) == len({t["protocol"] for t in tables})
    return {t["protocol"]: t for t in tables}


def _cells(table: dict) -> dict[tuple[str, float], dict]:
    return {(f["family"], ratio): cell for f in table["families"] for ratio, cell in f["cells"].items()}


def test_family_and_ratio_come_from_the_parsed_spec() -> None:
    assert plan_compression("dense") == ("dense", "", 0.0)
    assert plan_compression("snapkv:budget=0.125")[::2] == ("snapkv", 0.875)
    family, variant, ratio = plan_compression("adaptive(snapkv:budget=0.5,window_size=16):alpha=0.3")
    assert (family, ratio) == ("adaptive(snapkv)", 0.5)
    assert "alpha=0.3" in variant and "window_size=16" in variant and "budget" not in variant
    assert plan_compression("snapkv:budget=512") is None  # a token budget has no ratio
    assert plan_compression("no_such_method:budget=0.5") is None


def test_pivot_puts_the_mean_over_tasks_in_each_cell() -> None:
    aware = _by_protocol(leaderboard_rows())["query-aware"]
    assert aware["ratios"] == [0.0, 0.25, 0.5, 0.75]
    assert aware["tasks"] == {"niah_single_1": 2, "vt": 2} and aware["plans"] == 6
    assert [f["family"] for f in aware["families"]] == [
        "dense",
        "streaming_llm",
        "snapkv",
        "adaptive(snapkv)",
    ]
    cells = _cells(aware)
    # Each task weighs the same: the mean of the two per-task means.
    assert cells[("dense", 0.0)]["score"] == pytest.approx((1.0 + 0.5) / 2)
    assert cells[("snapkv", 0.25)]["score"] == pytest.approx((0.5 + 0.5) / 2)
    assert cells[("snapkv", 0.75)]["score"] == pytest.approx((0.0 + 0.25) / 2)  # budget 0.25: 75% removed
    assert cells[("streaming_llm", 0.5)]["score"] == pytest.approx((0.5 + 0.0) / 2)
    assert cells[("adaptive(snapkv)", 0.5)]["score"] == pytest.approx(1.0)
    assert ("snapkv", 0.5) not in cells and ("streaming_llm", 0.25) not in cells
    # Paired difference to dense on the same samples.
    assert cells[("snapkv", 0.75)]["delta"] == pytest.approx(0.125 - 0.75)
    assert cells[("adaptive(snapkv)", 0.5)]["delta"] == pytest.approx(0.25)
    assert cells[("dense", 0.0)]["delta"] is None
    # Two samples per task: intervals exist and hold the mean.
    lo, hi = cells[("snapkv", 0.75)]["ci"]
    assert lo <= 0.125 <= hi and lo < hi
    dlo, dhi = cells[("snapkv", 0.75)]["delta_ci"]
    assert dlo <= 0.125 - 0.75 <= dhi
    markdown = leaderboard_markdown(aware)
    assert markdown.splitlines()[0] == "| method | 0 (dense) | 0.25 | 0.5 | 0.75 |"
    assert re.search(r"\| snapkv \| - \| 50\.0 \[[^]]+\], Δ -25\.0 \[[^]]+\] \| - \| 12\.5 \[", markdown)


def test_only_samples_every_plan_finished_count() -> None:
    full = _by_protocol(leaderboard_rows())["query-aware"]
    partial = _by_protocol(leaderboard_rows() + unfinished_rows())["query-aware"]
    assert partial["tasks"] == {"niah_single_1": 2, "vt": 2}  # the unfinished samples are dropped
    assert partial["unfinished_tasks"] == ["cwe"]
    assert _cells(partial) == _cells(full)
    # Without the filter, dense's extra vt sample alone would have moved dense's mean.
    one = [r for r in leaderboard_rows() if not (r["task"] == "vt" and r["index"] == 1)]
    single = _by_protocol(one)["query-aware"]
    assert single["tasks"] == {"niah_single_1": 2, "vt": 1}
    cell = _cells(single)[("snapkv", 0.25)]
    assert cell["score"] == pytest.approx((0.5 + 1.0) / 2)
    assert math.isnan(cell["ci"][0])  # a task with one sample: no interval


def test_protocols_stay_separate() -> None:
    tables = _by_protocol(leaderboard_rows())
    assert list(tables) == ["query-aware", "query-agnostic"]
    agnostic = tables["query-agnostic"]
    assert agnostic["plans"] == 3 and agnostic["ratios"] == [0.0, 0.25, 0.75]
    cells = _cells(agnostic)
    assert cells[("dense", 0.0)]["score"] == pytest.approx(0.25)
    assert cells[("snapkv", 0.25)]["score"] == 0.0
    assert cells[("snapkv", 0.25)]["delta"] == pytest.approx(-0.25)  # against the agnostic dense
    # A sample the agnostic run has not finished does not drop it from the query-aware table.
    rows = [r for r in leaderboard_rows() if not (r["protocol"] == "query-agnostic" and r["task"] == "vt")]
    tables = _by_protocol(rows)
    assert tables["query-aware"]["tasks"] == {"niah_single_1": 2, "vt": 2}
    assert tables["query-agnostic"]["tasks"] == {"niah_single_1": 2}


def test_the_ratio_says_what_it_removes() -> None:
    """Evictors remove KV; a sparse decoder keeps it all and skips part of the prompt at each step, so
    the same ratio means something else, and the table (and its plot's axis) says which."""
    assert _by_protocol(leaderboard_rows())["query-aware"]["removes"] == "fraction of the KV cache removed"
    sparse = [
        _row(task, spec, sample, 1.0, "query-aware")
        for spec in ("dense", "quest:budget=0.75", "quest:budget=0.25")
        for task in ("niah_single_1", "vt")
        for sample in SAMPLES[task]
    ]
    assert _by_protocol(sparse)["query-aware"]["removes"] == "fraction of the prompt not attended"
    both = leaderboard_rows() + [r for r in sparse if r["method_spec"] != "dense"]
    assert _by_protocol(both)["query-aware"]["removes"] == (
        "fraction of the KV cache removed or of the prompt not attended"
    )


def test_one_budget_gives_no_leaderboard() -> None:
    rows = [r for r in leaderboard_rows() if r["method_spec"] in ("dense", "snapkv:budget=0.25")]
    assert leaderboard_tables(rows) == []


def test_report_writes_the_leaderboard_and_its_plots(tmp_path: Path) -> None:
    rows = leaderboard_rows() + unfinished_rows()
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    for protocol in ("query-aware", "query-agnostic"):
        assert (tmp_path / f"leaderboard_{protocol}.png").stat().st_size > 10000
    summary = (tmp_path / "summary.md").read_text()
    assert "## Leaderboard: accuracy by compression ratio" in summary
    assert "### query-aware, 4k" in summary and "### query-agnostic, 4k" in summary
    assert "2 samples per task (niah_single_1 2, vt 2)" in summary
    assert "Left out (no sample finished by every plan yet): cwe" in summary
    assert "![leaderboard_query-agnostic](leaderboard_query-agnostic.png)" in summary
    page = (tmp_path / "report.html").read_text()
    alts = set(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page))
    assert {"leaderboard_query-aware", "leaderboard_query-agnostic"} <= alts
    assert '<td class="down">12.5 [' in page  # snapkv at 0.75, below dense


def test_report_without_ratios_has_no_leaderboard(tmp_path: Path) -> None:
    rows = [r for r in leaderboard_rows() if r["method_spec"] in ("dense", "snapkv:budget=0.25")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    assert "Leaderboard" not in (tmp_path / "summary.md").read_text()
    assert not list(tmp_path.glob("leaderboard_*.png"))
