"""The report builds from a small fixture results file: tables with bootstrap intervals and paired
deltas, the depth x length heatmaps, the Pareto plots, the run's metadata, and one self-contained HTML
page that a real headless Chromium renders with every plot decoded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tokensift.bench.plots import pareto_front
from tokensift.bench.report import accuracy_table, bootstrap_ci, common_samples, method_means, write_report

CHROMIUM = Path("/usr/bin/chromium")


def _row(task: str, method: str, length: int, depth: float | None, index: int, score: float) -> dict:
    kv = 100.0 if method == "dense" else 27.0
    return {
        "model": "smollm2-135m",
        "task": task,
        "metric": "accuracy",
        "method": method,
        "method_spec": method,
        "length": length,
        "depth": depth,
        "index": index,
        "seed": 0,
        "score": score,
        "kv_bytes_peak": kv,
        "kv_bytes_dense": 100.0,
        "prefill_seconds": 2.0 if method == "dense" else 2.2,
        "decode_seconds": 1.0 if method == "dense" else 0.7,
        "decode_tokens_per_second": 10.0,
        "applied": True,
        "notes": [],
    }


def fixture_rows() -> list[dict]:
    rows = []
    for length in (2048, 4096):
        for depth in (0.0, 0.5, 1.0):
            for index in range(2):
                rows.append(_row("niah_single_1", "dense", length, depth, index, 1.0))
                rows.append(
                    _row("niah_single_1", "snapkv:budget=0.25", length, depth, index, float(depth < 1))
                )
        for index in range(4):
            rows.append(_row("vt", "dense", length, None, index, 0.8))
            rows.append(_row("vt", "snapkv:budget=0.25", length, None, index, 0.4))
    feature_row = _row("charbench_first_index", "dense", 0, None, 0, 1.0)
    feature_row["features"] = {"n_tokens": 2, "target_token_length": 3, "tokens": ["Eliz", "abeth"]}
    rows.append(feature_row)
    failed = _row("charbench_first_index", "snapkv:budget=0.25", 0, None, 0, 0.0)
    failed.update(
        score=None, error="snapkv budget resolves to 22 tokens, which does not exceed window_size 32"
    )
    rows.append(failed)
    return rows


def fixture_meta() -> dict:
    config = {"suite": "ruler-lite", "seed": 0, "samples": 10, "depth_samples": 1, "depths": [0.0, 0.5, 1.0]}
    config["lengths"] = [2048, 4096]
    env = {
        "command": "tokensift bench --suite ruler-lite --out DIR",
        "commit": "abc1234",
        "tokensift": "0.1.0",
        "torch": "2.13.0",
        "transformers": "5.24.0",
        "python": "3.11",
        "threads": 2,
        "machine": "x86_64",
    }
    model = {"name": "smollm2-135m", "model_type": "llama", "layers": 30, "kv_heads": 3, "dtype": "float32"}
    run = {"config": config, "environment": env, "started": 0.0}
    return {"model": model, "runs": [run, {**run, "started": 600.0}]}  # a resumed run: two invocations


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixture_rows()))
    (tmp_path / "meta.json").write_text(json.dumps(fixture_meta()))
    write_report(tmp_path)
    return tmp_path


def test_bootstrap_and_pareto_helpers() -> None:
    rng = np.random.default_rng(0)
    lo, hi = bootstrap_ci([0.0, 1.0] * 20, rng)
    assert lo < 0.5 < hi and hi - lo < 0.4
    assert bootstrap_ci([1.0] * 5, rng) == (1.0, 1.0)
    assert all(v != v for v in bootstrap_ci([1.0], rng))  # one sample: no interval (NaN)
    # (cost, accuracy): the cheaper-and-better points survive, sorted by cost.
    assert pareto_front([(1.0, 0.9), (0.3, 0.5), (0.5, 0.4), (0.2, 0.1)]) == [3, 1, 0]


def test_accuracy_table_deltas_are_paired_against_dense() -> None:
    table = {(e["task"], e["length"], e["method"]): e for e in accuracy_table(fixture_rows())}
    snap = table[("niah_single_1", 2048, "snapkv:budget=0.25")]
    assert snap["score"] == pytest.approx(4 / 6) and snap["delta"] == pytest.approx(-2 / 6)
    assert snap["delta_ci"][0] <= -2 / 6 <= snap["delta_ci"][1] and snap["paired"] == 6
    assert table[("vt", 4096, "snapkv:budget=0.25")]["delta"] == pytest.approx(-0.4)
    assert table[("vt", 4096, "dense")]["delta"] is None
    assert ("charbench_first_index", 0, "snapkv:budget=0.25") not in table  # failed runs are not scored
    # Averages over tasks only use samples every method has (a partial run leaves gaps).
    rows = fixture_rows()
    lone = rows.pop(0)  # dense, niah_single_1, 2k, depth 0, index 0
    kept = common_samples([r for r in rows if r["score"] is not None])
    assert not any(
        (r["task"], r["length"], r["depth"], r["index"]) == ("niah_single_1", 2048, 0.0, 0) for r in kept
    )
    assert len(kept) == len(rows) - 2 and lone["method"] == "dense"
    means = {(m["method"], m["length"]): m for m in method_means(fixture_rows())}
    assert means[("dense", 2048)]["score"] == pytest.approx((1.0 + 0.8) / 2)  # tasks weigh equally
    assert means[("dense", 0)]["tasks"] == 1


def test_report_from_fixture(report_dir: Path) -> None:
    summary = (report_dir / "summary.md").read_text()
    assert "| niah_single_1 | 2k | snapkv:budget=0.25 | 6 | 66.7% |" in summary
    assert re.search(
        r"\| vt \| 4k \| snapkv:budget=0\.25 \| 4 \| 40\.0% \| \[40\.0, 40\.0\] \| -40\.0 \|", summary
    )
    assert "charbench_first_index under snapkv:budget=0.25: 1 run(s) failed" in summary
    assert "essay" not in summary or "substitute" in summary
    for name in ("niah_single_1_heatmap", "pareto_kv", "pareto_latency", "accuracy_vs_kv"):
        assert (report_dir / f"{name}.png").stat().st_size > 5000, name
    page = (report_dir / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert {alt for alt, _ in images} >= {"niah_single_1_heatmap", "pareto_kv", "pareto_latency"}
    for _, data in images:
        assert len(data) > 5000
    assert "<script" not in page and "http" not in page  # self-contained, nothing fetched
    for text in (
        "tokensift bench --suite ruler-lite --out DIR",
        "abc1234",
        "transformers 5.24.0",
        "seed 0",
        "2 (resumed)",
    ):
        assert text in page, text
    assert "Δ vs dense" in page and "95% CI" in page and "CharBench by tokenisation" in page
    assert "RULER niah_single_1" in page  # each task's source


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    profile = cwd / "profile"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_no_op_rows_say_why(tmp_path: Path) -> None:
    """A row whose method changed nothing is marked with the reason the runs recorded."""
    note = "a_shape changed nothing: prefill_attention_pairs_skipped stayed 0"
    rows = [_row("vt", "dense", 2048, None, i, 0.8) for i in range(2)]
    for method, idle in (("a_shape", [True, True]), ("minference", [True, False])):
        for i, off in enumerate(idle):
            row = _row("vt", method, 2048, None, i, 0.8)
            row.update(applied=not off, notes=[note.replace("a_shape", method)] if off else [])
            rows.append(row)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps(fixture_meta()))
    summary = write_report(tmp_path).read_text()
    assert f"| vt | a_shape ({'no-op: ' + note}) | 2k | 2 |" in summary
    assert "| vt | 2k | minference (no-op in 1 of 2 runs: minference changed nothing" in summary
    assert "| vt | dense | 2k |" in summary  # applied rows carry no mark
    page = (tmp_path / "report.html").read_text()
    assert "a_shape (no-op: a_shape changed nothing" in page


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(
    report_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("browser")
    page = (report_dir / "report.html").read_text()
    # DOM probe: the same page plus a script that lists every image's decoded size once loaded.
    probe = page.replace(
        "</body>",
        "<script>window.onload = () => { const p = document.createElement('pre'); p.id = 'probe';"
        " p.textContent = JSON.stringify([...document.images].map(i => [i.alt, i.complete, i.naturalWidth,"
        " i.naturalHeight])); document.body.appendChild(p); };</script></body>",
    )
    (work / "probe.html").write_text(probe)
    done = _chromium("--virtual-time-budget=10000", "--dump-dom", (work / "probe.html").as_uri(), cwd=work)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, flags=re.S)
    assert found, done.stderr[-2000:]
    decoded = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(decoded) >= 4
    for alt, complete, width, height in decoded:
        assert complete and width > 300 and height > 150, alt
    # Screenshot of the real page: the heatmap's colours are on screen, so the plots were painted.
    shot = work / "shot.png"
    done = _chromium(
        "--window-size=1280,6000", f"--screenshot={shot}", (report_dir / "report.html").as_uri(), cwd=work
    )
    assert shot.exists(), done.stderr[-2000:]
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).astype(int)
    green = np.all(np.abs(pixels - [0x0C, 0xD7, 0x9F]) < 12, axis=-1).sum()  # NIAH "found" colour
    red = np.all(np.abs(pixels - [0xF0, 0x49, 0x6E]) < 12, axis=-1).sum()  # NIAH "missed" colour
    assert green > 2000 and red > 500, (green, red)
    shutil.rmtree(work / "profile", ignore_errors=True)
