"""The lossy two-model loops' thresholds, tuned on a calibration split (issue 16, part 4).

    G=$(python benchmarks/loop_thresholds.py grid)
    python benchmarks/generation_loops.py --models --pair qwen2.5-coder-1.5b:qwen2.5-coder-0.5b --seed 0 \\
        --pair-workloads edit_records change_function --pair-samples 2 --pair-new-tokens 160 --repeats 1 \\
        --pair-baselines --pair-ours $G --json benchmarks/results/loop_thresholds_calibration.json
    python benchmarks/loop_thresholds.py choose benchmarks/results/loop_thresholds_calibration.json

`grid` prints the settings tried: BiLD's fallback and rollback thresholds (Kim et al., NeurIPS 2023,
sweep both) and entropy routing's entropy threshold, each family's default among them. `choose` reads
the calibration run (seed 0: prompts never used for the held-out figures) and picks, per family, the
fastest setting whose task score over the calibration prompts is at least the large model's own
(transformers' greedy on the same prompts); if none is, the best-scoring one. Speed is the decode
rate against transformers' greedy on the same prompt, paired per repeat (median [IQR] over prompts
and repeats). It prints every setting and the chosen spec per family, to run on the held-out seed
with `--pair-ours`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tokensift.bench.timing import Spread
from tokensift.errors import fail

GRID = [
    "bild:fallback_threshold=0.4,rollback_threshold=5",
    "bild",  # fallback 0.6, rollback 5 (the defaults)
    "bild:fallback_threshold=0.8,rollback_threshold=5",
    "bild:fallback_threshold=0.6,rollback_threshold=3",
    "bild:fallback_threshold=0.8,rollback_threshold=3",
    "bild:fallback_threshold=0.9,rollback_threshold=2",
    "entropy_routing:threshold=0.2",
    "entropy_routing",  # threshold 0.45 (the default)
    "entropy_routing:threshold=0.8",
    "entropy_routing:threshold=1.2",
]
REFERENCE = "hf_greedy"


def rates(run: dict[str, Any]) -> list[float]:
    """Decode tokens per second, one per repeat."""
    return [run["new_tokens"] / seconds for seconds in run["decode_seconds"]]


def settings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every loop of the run: its family, mean score over the prompts and speed against the reference."""
    pair = report.get("pair") or {}
    prompts, small = pair.get("prompts"), pair.get("small")
    if not prompts or REFERENCE not in prompts[0]["runs"]:
        fail("no two-model prompts in this file: pass the --json of a `generation_loops.py --pair` run")
    out = []
    for key in prompts[0]["runs"]:
        spec = key.replace(f",small={small}", "").replace(f":small={small}", "")
        family = spec.split(":")[0]
        if family not in ("bild", "entropy_routing") or "lossless=true" in spec:
            continue
        runs = [(p["runs"][key], p["runs"][REFERENCE]) for p in prompts if key in p["runs"]]
        if len(runs) < len(prompts):
            continue  # a setting the run had not finished
        # Rate ratios paired per repeat, as generation_loops.py pairs them.
        speed = Spread.of(a / b for ours, ref in runs for a, b in zip(rates(ours), rates(ref), strict=True))
        out.append(
            {
                "family": family,
                "spec": spec,
                "prompts": len(runs),
                "score": statistics.fmean(ours["score"] for ours, _ in runs),
                "reference_score": statistics.fmean(ref["score"] for _, ref in runs),
                "vs_large_greedy": speed.as_dict(),
                "identical_to_large_greedy": sum(bool(ours["identical_to_hf_greedy"]) for ours, _ in runs),
            }
        )
    return out


def choose(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per family: the fastest setting scoring at least the large model, else the best scorer."""
    chosen = {}
    for family in sorted({r["family"] for r in rows}):
        mine = [r for r in rows if r["family"] == family]
        keep = [r for r in mine if r["score"] >= r["reference_score"] - 1e-9]
        pick = (
            max(keep, key=lambda r: r["vs_large_greedy"]["median"])
            if keep
            else max(mine, key=lambda r: (r["score"], r["vs_large_greedy"]["median"]))
        )
        chosen[family] = pick["spec"]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("grid", help="print the settings to pass to generation_loops.py --pair-ours")
    p = sub.add_parser("choose", help="pick each family's setting from a calibration run")
    p.add_argument("calibration", type=Path)
    p.add_argument("--json", type=Path, help="also write the settings and the choice here")
    args = parser.parse_args()
    if args.step == "grid":
        print(" ".join(GRID))
        return
    try:
        report = json.loads(args.calibration.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        fail(f"cannot read {args.calibration} as a generation_loops.py --json file ({exc})")
    rows = settings(report)
    if not rows:
        fail(f"{args.calibration} has no finished lossy bild/entropy_routing setting on every prompt")
    chosen = choose(rows)
    print("| setting | prompts | score | large model's score | decode vs large greedy | identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mark = " (chosen)" if chosen[r["family"]] == r["spec"] else ""
        print(
            f"| `{r['spec']}`{mark} | {r['prompts']} | {r['score']:.2f} | {r['reference_score']:.2f} | "
            f"{Spread(**r['vs_large_greedy']).format(suffix='x')} | "
            f"{r['identical_to_large_greedy']}/{r['prompts']} |"
        )
    print("chosen: " + " ".join(chosen.values()))
    if args.json:
        saved = {"calibration": str(args.calibration), "settings": rows, "chosen": chosen}
        args.json.write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
