"""benchmarks/kvpress_side_by_side.py end to end on a tiny random model saved to disk.

The tokensift side always runs; the kvpress side runs where `make bench-kvpress` has built
.venv-kvpress (kvpress 0.5.5 pins transformers < 5.3, so it never shares our venv).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import load_benchmark, tiny_smol_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kvpress_side_by_side.py"
KVPRESS_PYTHON = ROOT / ".venv-kvpress" / "bin" / "python"
KVPRESS_READY = ROOT / ".venv-kvpress" / ".installed"  # written by `make bench-kvpress` once installed


def _run(python: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("kvpress")
    model = tiny_smol_model()
    model.model.save_pretrained(work / "model")
    model.tokenizer.save_pretrained(work / "model")
    out = work / "prompts.jsonl"
    done = _run(
        sys.executable, "prompts", "--model", str(work / "model"), "--tasks", "niah_single_1",
        "--length", "300", "--samples", "2", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_tokensift_side_and_table(prompts: Path) -> None:
    rows = prompts.with_name("tokensift.jsonl")
    args = ["run", "--prompts", str(prompts), "--presses", "dense,knorm,tova", "--ratios", "0.5"]
    done = _run(sys.executable, *args, "--side", "tokensift", "--out", str(rows))
    assert done.returncode == 0, done.stderr
    written = [json.loads(line) for line in rows.read_text().splitlines()]
    # 2 prompts x (dense + 2 presses at one ratio) x 2 protocols
    assert len(written) == 2 * 3 * 2
    by = {(r["press"], r["protocol"], r["prompt"]): r for r in written}
    for key, row in by.items():
        assert row["peak_rss_mib"] >= row["rss_before_mib"] > 0
        if key[0] != "dense":
            dense = by[("dense", key[1], key[2])]
            assert row["kv_bytes"] < 0.7 * dense["kv_bytes"]  # half the prompt removed, memory too
    # Resuming runs nothing new.
    again = _run(sys.executable, *args, "--side", "tokensift", "--out", str(rows))
    assert again.returncode == 0 and len(rows.read_text().splitlines()) == len(written)
    table = _run(sys.executable, "table", str(rows), "--json", str(prompts.with_name("t.json")))
    assert table.returncode == 0, table.stderr
    cells = json.loads(prompts.with_name("t.json").read_text())["cells"]
    assert {c["press"] for c in cells} == {"dense", "knorm", "tova"}


def test_bad_prompt_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"context_ids": [1, 2]}\n')
    done = _run(
        sys.executable, "run", "--side", "tokensift", "--prompts", str(bad), "--out", str(tmp_path / "o")
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "p.jsonl:1 is not a prompt row" in done.stderr


@pytest.mark.skipif(not KVPRESS_READY.exists(), reason="kvpress venv absent: `make bench-kvpress` builds it")
def test_kvpress_side_matches_dense_exactly(prompts: Path) -> None:
    """Same weights, same token ids: dense greedy output must agree between the two libraries, and the
    presses both have must hold the same KV bytes."""
    ours, theirs = prompts.with_name("o.jsonl"), prompts.with_name("k.jsonl")
    args = ["run", "--prompts", str(prompts), "--presses", "dense,knorm,streaming_llm", "--ratios", "0.5"]
    for python, side, out in ((sys.executable, "tokensift", ours), (KVPRESS_PYTHON, "kvpress", theirs)):
        done = _run(python, *args, "--side", side, "--out", str(out))
        assert done.returncode == 0, done.stderr[-2000:]
    a = {(r["press"], r["protocol"], r["prompt"]): r for r in map(json.loads, ours.read_text().splitlines())}
    b = {
        (r["press"], r["protocol"], r["prompt"]): r for r in map(json.loads, theirs.read_text().splitlines())
    }
    assert a.keys() == b.keys()
    for key in a:
        if key[0] == "dense":
            assert a[key]["prediction"] == b[key]["prediction"], key
        if (
            key[0] == "knorm"
        ):  # one-shot in both: the same cache size (we round the kept count, kvpress floors)
            assert abs(a[key]["tokens_held"] - b[key]["tokens_held"]) <= 1, key
        if key[0] == "streaming_llm":  # ours evicts at every step (the paper); kvpress after the prefill only
            assert a[key]["tokens_held"] < b[key]["tokens_held"], key


def test_table_pairs_the_libraries_by_prompt(tmp_path: Path) -> None:
    """The paired table compares the prompts both sides ran, one by one: score agreement, the accuracy
    difference, and per-prompt time, memory and KV ratios."""

    def row(side: str, prompt: int, score: float, seconds: float, above: float, kv: int) -> dict:
        return {
            "side": side, "press": "knorm", "ratio": 0.75, "protocol": "query-agnostic", "prompt": prompt,
            "score": score, "prefill_seconds": seconds, "peak_rss_mib": 1000 + above,
            "rss_before_mib": 1000, "kv_bytes": kv, "prediction": "x",
        }  # fmt: skip

    ours = [row("tokensift", p, s, 10.0, 100.0, 4) for p, s in enumerate([1, 1, 0, 1])]
    # a fresh-process row is its own cell, paired only with kvpress's fresh-process rows (none here)
    ours.append({**row("tokensift", 0, 0, 99.0, 9.0, 4), "fresh_process": True})
    theirs = [row("kvpress", p, s, 20.0, 400.0, 4) for p, s in enumerate([1, 0, 0, 0, 1])]  # one more prompt
    ours[0]["prediction"], ours[2]["prediction"] = " x ", "y"  # same answer up to spaces; another answer
    for name, rows in (("o.jsonl", ours), ("k.jsonl", theirs)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.json"
    done = _run(
        sys.executable, "table", str(tmp_path / "o.jsonl"), str(tmp_path / "k.jsonl"), "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    (pair,) = json.loads(out.read_text())["paired"]
    assert pair["n"] == 4 and pair["same_score"] == 2  # prompt 4 ran on one side only
    assert pair["same_answer"] == 3
    assert pair["accuracy_delta"] == 0.5 and pair["ci95"][0] <= 0.5 <= pair["ci95"][1]
    assert pair["prefill_ratio"] == [0.5, 0.5, 0.5] and pair["peak_over_start_ratio"][1] == 0.25
    assert pair["kv_ratio"][1] == 1.0
    md = out.with_suffix(".md").read_text()
    assert "| query-agnostic | knorm | 0.75 | shared | 4 | 2 | +0.50" in md
    # No README row for a cell one library has not finished (kvpress ran a prompt ours did not).
    assert md.rstrip().endswith("README rows (shared-process cells both libraries ran):")
    cells = json.loads(out.read_text())["cells"]
    assert sorted((c["process"], c["side"], c["n"]) for c in cells) == [
        ("fresh", "tokensift", 1), ("shared", "kvpress", 5), ("shared", "tokensift", 4)
    ]  # fmt: skip
    # A prompts file among the results (e.g. a `*.jsonl` glob) is refused in one line, before any output.
    (tmp_path / "prompts.jsonl").write_text('{"context_ids": [1], "question_ids": [2], "answers": ["x"]}\n')
    bad = _run(sys.executable, "table", str(tmp_path / "o.jsonl"), str(tmp_path / "prompts.jsonl"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and not bad.stdout
    assert "prompts.jsonl:1 is not a result row" in bad.stderr


def test_fresh_process_rows_match_the_shared_process(prompts: Path) -> None:
    """`--fresh-process` runs each row in its own process: the same prediction as the shared-process
    run, and a peak measured from the loaded model of that process."""
    shared, fresh = prompts.with_name("shared.jsonl"), prompts.with_name("fresh.jsonl")
    args = ["run", "--side", "tokensift", "--prompts", str(prompts), "--presses", "knorm", "--ratios", "0.5"]
    args += ["--protocol", "query-agnostic", "--limit", "1"]
    assert _run(sys.executable, *args, "--out", str(shared)).returncode == 0
    done = _run(sys.executable, *args, "--fresh-process", "--out", str(fresh))
    assert done.returncode == 0, done.stderr
    (a,), (b,) = ([json.loads(line) for line in f.read_text().splitlines()] for f in (shared, fresh))
    assert b["fresh_process"] and not a["fresh_process"]
    assert b["prediction"] == a["prediction"] and b["kv_bytes"] == a["kv_bytes"]
    assert b["peak_rss_mib"] >= b["rss_before_mib"] > 0
    assert b["heap_trimmed"] in (True, False) and a["heap_trimmed"] == b["heap_trimmed"]


def test_transformers_cell_runs_dense_without_kvpress(prompts: Path) -> None:
    """The `transformers` side runs kvpress's harness with no press in our venv (kvpress is not
    installed here): the dense answer ours gives, with its versions, CPU seconds and page faults."""
    args = ["cell", "--prompts", str(prompts), "--index", "0", "--press", "dense", "--ratio", "0"]
    args += ["--protocol", "query-agnostic"]
    rows = {}
    for side in ("transformers", "tokensift"):
        done = _run(sys.executable, *args, "--side", side)
        assert done.returncode == 0, done.stderr
        rows[side] = json.loads(done.stdout.split("ROW ", 1)[1])
    hf, ours = rows["transformers"], rows["tokensift"]
    assert hf["prediction"] == ours["prediction"] and hf["method"] == "dense"
    assert hf["versions"]["transformers"] == ours["versions"]["transformers"]
    assert hf["cpu_user_s"] >= 0 and hf["minor_faults"] > 0 and "cpu_sys_s" in hf
    done = _run(sys.executable, *args[:6], "knorm", *args[7:], "--side", "transformers")
    assert done.returncode == 2 and "runs dense only" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_peak_baseline_excludes_freed_heap() -> None:
    """`reset_peak_rss` reads its baseline after giving free heap back to the OS: heap a loader freed
    but kept resident would otherwise let a run "peak lower above the model" by reusing it."""
    code = """
import json, sys, importlib.util
spec = importlib.util.spec_from_file_location("sbs", sys.argv[1])
sbs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sbs)
blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MiB of heap-sized blocks, touched
keep = blocks[-1]  # the newest block stays live, so the heap's top cannot simply shrink
del blocks
before = sbs.rss_mib("VmRSS")
print(json.dumps({"before": before, **sbs.reset_peak_rss()}))
"""
    cmd = [sys.executable, "-c", code, str(SCRIPT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    if not out["heap_trimmed"]:
        pytest.skip("no glibc malloc_trim here")
    assert out["before"] - out["rss_before_mib"] > 100  # the freed blocks left the baseline


def test_resumed_run_warms_the_model_before_its_first_measured_row(
    prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run appending a second press to a file that has rows still loads and warms the model before
    the first peak baseline: otherwise that row's "peak above start" counts the whole model."""
    sbs = load_benchmark("kvpress_side_by_side")
    calls: list[tuple[str, int | None]] = []

    def runner(prompt: dict, press: str, ratio: float, protocol: str, dtype: str) -> dict:
        calls.append((press, prompt.get("max_new_tokens")))
        return {"prediction": "x", "prefill_seconds": 1.0, "kv_bytes": 1, "tokens_held": 1}

    monkeypatch.setitem(sbs.RUNNERS, "tokensift", runner)
    out = tmp_path / "rows.jsonl"
    first = {"press": "knorm", "ratio": 0.5, "protocol": "query-agnostic", "prompt": 0, "score": 1.0}
    out.write_text(json.dumps({**first, "side": "tokensift"}) + "\n")
    namespace = sbs.argparse.Namespace(
        side="tokensift", prompts=prompts, presses="tova", ratios="0.5", protocol="query-agnostic",
        dtype="float32", limit=1, fresh_process=False, out=out,
    )  # fmt: skip
    sbs.run_side(namespace)
    assert calls == [("dense", 1), ("tova", calls[1][1])]  # the warm-up, then the measured row
    calls.clear()
    sbs.run_side(namespace)  # nothing left to run: no warm-up either
    assert calls == []


def test_peaks_from_an_unloaded_baseline_are_left_out() -> None:
    """A row whose baseline was read before the model was loaded (old resumed runs) keeps its
    accuracy and time but is left out of the peak-above-start medians and ratios."""
    sbs = load_benchmark("kvpress_side_by_side")

    def row(side: str, prompt: int, before: float, above: float) -> dict:
        return {
            "side": side, "press": "knorm", "ratio": 0.25, "protocol": "query-agnostic", "prompt": prompt,
            "score": 1.0, "prefill_seconds": 10.0, "peak_rss_mib": before + above, "rss_before_mib": before,
            "kv_bytes": 4, "prediction": "x",
        }  # fmt: skip

    ours = [row("tokensift", 0, 220.0, 2500.0)] + [row("tokensift", p, 2400.0, 200.0) for p in (1, 2, 3)]
    theirs = [row("kvpress", p, 2450.0, 400.0) for p in range(4)]
    (pair,) = sbs.paired(ours + theirs)
    assert pair["n"] == 4 and pair["peak_pairs"] == 3
    assert list(pair["peak_over_start_ratio"]) == [0.5, 0.5, 0.5]
    assert list(pair["prefill_ratio"]) == [1.0, 1.0, 1.0]  # the row's time still counts
    cells = {c["side"]: c for c in sbs.summarise(ours + theirs)}
    assert cells["tokensift"]["peak_over_start_mib_median"] == 200.0
    assert cells["tokensift"]["peak_rows_unloaded"] == 1 and cells["kvpress"]["peak_rows_unloaded"] == 0


def fake_cells(
    sbs: Any, monkeypatch: pytest.MonkeyPatch, row: Callable[[str, str | None, int], dict[str, float]]
) -> list[tuple[str, str, str | None]]:
    """Stand in for the fresh `cell` processes of `malloc` and `timing`: each call is recorded as (press,
    side, MALLOC_MMAP_THRESHOLD_ it got) and answers `row(side, threshold, calls so far)`; a threshold
    the user exported is set, so a run that should not get one shows it if it inherits it."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "999")
    calls: list[tuple[str, str, str | None]] = []

    def child(cmd: list[str], env: dict[str, str], **_: object) -> subprocess.CompletedProcess[str]:
        side, press = cmd[cmd.index("--side") + 1], cmd[cmd.index("--press") + 1]
        threshold = env.get("MALLOC_MMAP_THRESHOLD_")
        calls.append((press, side, threshold))
        fixed = {"rss_before_mib": 2400.0, "prediction": " 1.", "threads": 2}
        fixed["versions"] = {"torch": "2.13.0", "transformers": "5.0"}
        done = {**fixed, **row(side, threshold, len(calls))}
        return subprocess.CompletedProcess(cmd, 0, "ROW " + json.dumps(done), "")

    monkeypatch.setattr(sbs.subprocess, "run", child)
    return calls


def run_step(
    sbs: Any, monkeypatch: pytest.MonkeyPatch, step: str, prompts: Path, out: Path, *args: str
) -> None:
    """The script's main() on `step` and `args`, with this interpreter as both libraries' Python."""
    paths = ["--prompts", str(prompts), "--out", str(out)]
    pythons = ["--tokensift-python", sys.executable, "--kvpress-python", sys.executable]
    monkeypatch.setattr(sys, "argv", ["kvpress_side_by_side.py", step, *paths, *pythons, *args])
    sbs.main()


def test_malloc_step_interleaves_sets_the_threshold_and_resumes(
    prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`malloc` runs one fresh process per (press, repeat, setting, library), interleaved; only the
    fixed-threshold runs get MALLOC_MMAP_THRESHOLD_ (a value the user exported is not inherited by the
    default runs); the results file is rewritten after every run and a rerun skips what it holds."""
    sbs = load_benchmark("kvpress_side_by_side")

    def row(side: str, threshold: str | None, _: int) -> dict[str, float]:
        above = 300.0 if threshold else (450.0 if side == "tokensift" else 400.0)
        return {"peak_rss_mib": 2400.0 + above, "prefill_seconds": 30.0}

    calls = fake_cells(sbs, monkeypatch, row)
    out = tmp_path / "malloc.json"
    args = ["--presses", "knorm,tova", "--repeats", "2"]
    run_step(sbs, monkeypatch, "malloc", prompts, out, *args)
    assert len(calls) == 2 * 2 * 2 * 2
    assert calls[:4] == [
        ("knorm", "tokensift", None), ("knorm", "kvpress", None),
        ("knorm", "tokensift", "131072"), ("knorm", "kvpress", "131072"),
    ]  # fmt: skip
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 16 and " malloc --prompts " in data["commands"][-1]
    by = {(s["press"], s["malloc"]): s for s in data["summary"]}
    default = by[("tova", "glibc default (dynamic mmap threshold)")]
    assert default["ours_minus_kvpress_mib"] == 50 and default["runs"] == {"tokensift": 2, "kvpress": 2}
    assert by[("tova", "MALLOC_MMAP_THRESHOLD_=131072")]["ours_minus_kvpress_mib"] == 0
    calls.clear()
    run_step(sbs, monkeypatch, "malloc", prompts, out, *args)  # everything is there: nothing runs again
    assert calls == [] and len(json.loads(out.read_text())["runs"]) == 16
    # another cell appends to the same file: its runs, its summary group and its command are added
    run_step(sbs, monkeypatch, "malloc", prompts, out, *args, "--presses", "knorm", "--ratio", "0.5")
    data = json.loads(out.read_text())
    assert len(calls) == 8 and len(data["runs"]) == 24 and len(data["commands"]) == 2
    groups = {(s["press"], s["ratio"]) for s in data["summary"]}
    assert groups == {("knorm", 0.25), ("tova", 0.25), ("knorm", 0.5)}


def test_timing_step_alternates_the_first_library_and_pairs_prefill_times(
    prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`timing` runs the default allocator only, five repeats unless told, the library that goes first
    alternating by repeat; the summary pairs each repeat's prefill times (ours / kvpress's)."""
    sbs = load_benchmark("kvpress_side_by_side")

    def row(side: str, _: str | None, call: int) -> dict[str, float]:
        seconds = 30.0 + call if side == "tokensift" else 40.0  # ours: 31, 34, 35, 38, 39 s
        return {"peak_rss_mib": 2800.0, "prefill_seconds": seconds}

    calls = fake_cells(sbs, monkeypatch, row)
    out = tmp_path / "timing.json"
    run_step(sbs, monkeypatch, "timing", prompts, out, "--presses", "streaming_llm")
    assert [side for _, side, _ in calls] == ["tokensift", "kvpress", "kvpress", "tokensift"] * 2 + [
        "tokensift", "kvpress"
    ]  # fmt: skip
    assert {threshold for *_, threshold in calls} == {None}  # the exported threshold is not inherited
    data = json.loads(out.read_text())
    (summary,) = data["summary"]
    assert summary["runs"] == {"tokensift": 5, "kvpress": 5} and summary["kvpress_prefill_s"][1] == 40.0
    assert summary["prefill_ratio"] == pytest.approx([34 / 40, 35 / 40, 38 / 40])
    assert {r["threads"] for r in data["runs"]} == {2} and "interleaved" in data["what"]
    # a file written after the first run of a pair (one library only) stays valid JSON: no NaN
    (partial,) = sbs.fresh_pairs_summary(data["runs"][:1])
    assert partial["kvpress_prefill_s"] is None and partial["prefill_ratio"] is None
    assert partial["tokensift_prefill_s"] == [31.0, 31.0, 31.0]


def test_malloc_step_bad_input_is_one_line(prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "malloc.json"

    def malloc(*extra: str, kvpress: str = sys.executable) -> subprocess.CompletedProcess[str]:
        args = ["malloc", "--prompts", str(prompts), "--kvpress-python", kvpress, "--out", str(out)]
        return _run(sys.executable, *args, *extra)

    done = malloc(kvpress=str(tmp_path / "none"))
    assert done.returncode == 2 and "--kvpress-python" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
    out.write_text("not json")
    done = malloc()
    assert done.returncode == 2 and "is not a results file" in done.stderr
    assert out.read_text() == "not json"  # left as it was
    out.unlink()
    done = malloc("--index", "99")
    assert done.returncode == 2 and "--index 99" in done.stderr and not out.exists()
    for bad, named in (("--repeats", "0"), ("--ratio", "1.5"), ("--ratio", "0")):
        done = malloc(bad, named)
        assert done.returncode == 2 and f"{bad} {named}" in done.stderr and not out.exists()
        assert len(done.stderr.strip().splitlines()) == 1
    for sides in ("tokensift", "tokensift,tokensift", "tokensift,vllm"):
        done = malloc("--sides", sides)
        assert done.returncode == 2 and f"--sides {sides}: pass two or three" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
    done = malloc("--sides", "tokensift,transformers,kvpress", "--presses", "knorm")
    assert done.returncode == 2 and "runs dense only" in done.stderr and not out.exists()


def test_timing_step_with_plain_transformers_rotates_three_arms(
    prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--sides tokensift,transformers,kvpress` (dense): plain transformers runs in our venv's Python,
    the first arm rotates by repeat, and the summary pairs ours / transformers and transformers /
    kvpress's beside ours / kvpress's, with each arm's CPU seconds and page faults."""
    sbs = load_benchmark("kvpress_side_by_side")
    seconds = {"tokensift": 33.0, "transformers": 30.0, "kvpress": 20.0}

    def row(side: str, _: str | None, call: int) -> dict[str, float]:
        cpu = {"cpu_user_s": 50.0, "cpu_sys_s": 5.0 + call, "minor_faults": 1000 * call}
        return {"peak_rss_mib": 2800.0, "prefill_seconds": seconds[side], **cpu}

    calls = fake_cells(sbs, monkeypatch, row)
    out = tmp_path / "timing3.json"
    sides = ["--sides", "tokensift,transformers,kvpress", "--presses", "dense", "--ratio", "0"]
    run_step(sbs, monkeypatch, "timing", prompts, out, *sides, "--repeats", "3")
    assert [side for _, side, _ in calls] == [
        "tokensift", "transformers", "kvpress",
        "transformers", "kvpress", "tokensift",
        "kvpress", "tokensift", "transformers",
    ]  # fmt: skip
    data = json.loads(out.read_text())
    (summary,) = data["summary"]
    assert summary["runs"] == {"tokensift": 3, "transformers": 3, "kvpress": 3}
    assert summary["prefill_ratio"] == pytest.approx([33 / 20] * 3)
    assert summary["prefill_ratio_tokensift_vs_transformers"] == pytest.approx([1.1] * 3)
    assert summary["prefill_ratio_transformers_vs_kvpress"] == pytest.approx([1.5] * 3)
    assert summary["tokensift_cpu_sys_s"][1] == 11.0  # calls 1, 6, 8: 6, 11, 13 s
    assert summary["kvpress_minor_faults"][1] == 5000 and "third arm" in data["what"]
    assert {r["ratio"] for r in data["runs"]} == {0.0}
    assert {r["versions"]["transformers"] for r in data["runs"]} == {"5.0"}


def test_profile_step_splits_press_work_from_the_model(prompts: Path) -> None:
    """`profile` records, per press and repeat, the press's own work (its `compress` calls) beside the
    model's linear layers and the whole call; dense compresses nothing; a rerun adds nothing."""
    out = prompts.with_name("profile.json")
    args = ["profile", "--prompts", str(prompts), "--presses", "dense,knorm,adakv_snapkv", "--ratio", "0.5"]
    args += ["--protocol", "query-aware", "--repeats", "1", "--out", str(out)]
    done = _run(sys.executable, *args)
    assert done.returncode == 0, done.stderr
    runs = {r["press"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"dense", "knorm", "adakv_snapkv"}
    assert runs["dense"]["compress_seconds"] == 0
    for press in ("knorm", "adakv_snapkv"):
        run = runs[press]
        assert 0 < run["compress_seconds"] < run["profiled_seconds"]
        assert 0 < run["linear_seconds"] < run["profiled_seconds"]
    again = _run(sys.executable, *args)
    assert again.returncode == 0 and len(json.loads(out.read_text())["runs"]) == 3
