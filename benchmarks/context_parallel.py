"""Context parallelism on this machine (measured) and at scale (projected by a communication model).

    flock /tmp/tokensift-heavy.lock .venv/bin/python benchmarks/context_parallel.py \
        [--model smollm2-135m | random-gqa] [--length 2048] [--parallel 1,2,4] [--repeats 2]

Measured, per P and schedule, with P gloo processes on this machine (torch.multiprocessing, loopback):
prefill seconds (slowest rank), point-to-point bytes each rank sent (counted) next to the model's
count, seconds each rank waited on communication, seconds of block compute, KV bytes each rank held
(against single-process dense) and each process's peak RSS (weights are replicated, so RSS does not
shrink). Two cores cannot show speed-ups past two ranks; P=4 runs four one-thread processes on two
cores. Projected: `tokensift.distributed.costmodel` for P = 2..64 at 25 and 400 GB/s, ring vs
tokenring, from the byte counts the partition implies (checked against the counted bytes) and a
compute rate: the one measured here, and an assumed GPU-class rate (stated in the JSON).
Writes benchmarks/results/context_parallel.json and docs/context_parallel.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.distributed import generate_context_parallel
from tokensift.distributed.costmodel import Shape, bytes_per_rank, layer_seconds, step_costs
from tokensift.runtime.generate import encode

ROOT = Path(__file__).resolve().parent.parent
GPU_FLOPS = 400e12  # assumed sustained attention throughput of one modern GPU (bf16), for projection only
BANDWIDTHS = {"25 GB/s": 25e9, "400 GB/s": 400e9}
PROJECTED_RANKS = [2, 4, 8, 16, 32, 64]
PROJECTED_SHAPES = {
    "SmolLM2-135M (GQA 9:3, d=64)": Shape(9, 3, 64, 2),
    "Llama-2-7B (MHA 32:32, d=128; TokenRing's paper)": Shape(32, 32, 128, 2),
    "Llama-3-8B (GQA 32:8, d=128)": Shape(32, 8, 128, 2),
}


RANDOM_MODEL = "random-gqa"  # built in code: 4 layers, 8 query / 2 KV heads of 32, seeded


def load_model(name: str) -> tokensift.Model:
    if name != RANDOM_MODEL:
        return tokensift.load(name)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    return tokensift.wrap(LlamaForCausalLM(config), name=RANDOM_MODEL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    torch.set_num_threads(max(1, 2 // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    model = load_model(config["model"])
    rows = []
    for schedule in config["schedules"]:
        generate_context_parallel(
            model, config["ids"][:256], parallel=world, schedule=schedule, max_new_tokens=1
        )
        for _ in range(config["repeats"]):
            result = generate_context_parallel(
                model, config["ids"], parallel=world, schedule=schedule, max_new_tokens=1, ignore_eos=True
            )
            rows.append(
                {
                    "schedule": schedule,
                    "counters": result.stats.counters,
                    "dense": result.stats.kv_bytes_dense,
                }
            )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure(
    model: tokensift.Model, ids: list[int], world: int, schedules: list[str], repeats: int
) -> list[dict]:
    shape = Shape(
        model.config.num_attention_heads,
        model.num_kv_heads,
        model.head_dim,
        torch.finfo(model.dtype).bits // 8,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        config = {"model": model.name, "ids": ids, "schedules": schedules, "repeats": repeats}
        mp.spawn(worker, args=(world, free_port(), config, out), nprocs=world)
        runs = json.loads(Path(out).read_text())
    n, layers = len(ids), model.num_layers
    results = []
    for schedule in schedules:
        mine = [r for r in runs if r["schedule"] == schedule]
        per_rank = []
        predicted = bytes_per_rank(n, world, shape, schedule)
        pairs = [sum(st["pairs"][r] for st in step_costs(n, world, shape, schedule)) for r in range(world)]
        for r in range(world):

            def median(name: str, rank: int = r, runs: list = mine) -> float:
                return statistics.median(run["counters"][f"cp_rank{rank}_{name}"] for run in runs)

            compute = median("compute_seconds")
            flops = pairs[r] * 4 * shape.head_dim * shape.q_heads * layers
            per_rank.append(
                {
                    "rank": r,
                    "prefill_seconds": median("prefill_seconds"),
                    "p2p_bytes_sent": int(median("p2p_bytes")),
                    "p2p_bytes_model": predicted[r] * layers,
                    "bytes_sent_total": int(median("bytes_sent")),
                    "comm_wait_seconds": median("wait_seconds"),
                    "attention_compute_seconds": compute,
                    "attention_flops_per_second": flops / compute if compute else None,
                    "kv_bytes_after_prefill": int(median("kv_bytes_prefill")),
                    "kv_fraction_of_dense": median("kv_bytes_prefill") / mine[0]["dense"],
                    "max_rss_bytes": int(median("max_rss_bytes")),
                }
            )
        results.append(
            {
                "parallel": world,
                "schedule": schedule,
                "prompt_tokens": n,
                "prefill_seconds": max(p["prefill_seconds"] for p in per_rank),
                "repeats": repeats,
                "ranks": per_rank,
            }
        )
        print(
            f"P={world} {schedule:9s} prefill {results[-1]['prefill_seconds']:.2f}s  "
            + "  ".join(
                f"r{p['rank']}: sent {p['p2p_bytes_sent'] / 2**20:.1f} MiB "
                f"(model {p['p2p_bytes_model'] / 2**20:.1f}) "
                f"wait {p['comm_wait_seconds']:.2f}s KV {p['kv_fraction_of_dense']:.3f}"
                for p in per_rank
            ),
            flush=True,
        )
    return results


def project(n: int, cpu_flops: float | None) -> list[dict]:
    rows = []
    rates = [("assumed GPU", GPU_FLOPS)] + ([("measured CPU", cpu_flops)] if cpu_flops else [])
    for shape_name, shape in PROJECTED_SHAPES.items():
        for rate_name, rate in rates:
            for bw_name, bw in BANDWIDTHS.items():
                for schedule in ("ring", "tokenring"):
                    for parts in PROJECTED_RANKS:
                        t = layer_seconds(n, parts, shape, schedule, rate, bw)
                        rows.append(
                            {
                                "shape": shape_name,
                                "compute_rate": rate_name,
                                "flops_per_second": rate,
                                "bandwidth": bw_name,
                                "schedule": schedule,
                                "parallel": parts,
                                "prompt_tokens": n,
                                **t,
                                "max_bytes_per_rank": max(bytes_per_rank(n, parts, shape, schedule)),
                            }
                        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(PROJECTED_SHAPES)
    fig, axes = plt.subplots(len(shapes), len(BANDWIDTHS), figsize=(11, 3.6 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, bw in enumerate(BANDWIDTHS):
            ax = axes[i][j]
            sel = [
                r
                for r in rows
                if r["shape"] == shape and r["bandwidth"] == bw and r["compute_rate"] == "assumed GPU"
            ]
            for schedule, style in (("ring", "o-"), ("tokenring", "s-")):
                pts = [r for r in sel if r["schedule"] == schedule]
                ax.plot(
                    [r["parallel"] for r in pts], [r["seconds"] * 1e3 for r in pts], style, label=schedule
                )
            compute = [r for r in sel if r["schedule"] == "ring"]
            ax.plot(
                [r["parallel"] for r in compute],
                [r["compute_seconds"] * 1e3 for r in compute],
                "k:",
                label="compute only",
            )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape}\n{bw} links", fontsize=9)
            ax.set_xlabel("ranks P")
            ax.set_ylabel("ms per layer (projected)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    n = rows[0]["prompt_tokens"]
    fig.suptitle(
        f"Projected prefill attention per layer, {n // 1024}K tokens, {GPU_FLOPS / 1e12:.0f} TFLOP/s assumed "
        "(communication model, not measured)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(args: argparse.Namespace, body: dict) -> None:
    command = "python benchmarks/context_parallel.py " + (
        "--project-only"
        if args.project_only
        else f"--model {args.model} --length {args.length} --parallel {args.parallel} "
        f"--repeats {args.repeats}"
    )
    result = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch": torch.__version__,
        **{k: v for k, v in body.items() if k != "projection_rows"},
        "projection": {
            "what": "tokensift.distributed.costmodel: per step max(compute, transfer); full mesh, duplex",
            "prompt_tokens": args.project_length,
            "assumed_gpu_flops_per_second": GPU_FLOPS,
            "bandwidths": BANDWIDTHS,
            "rows": body["projection_rows"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=tokensift.DEFAULT_MODEL)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--parallel", default="1,2,4")
    parser.add_argument("--schedules", default="ring,tokenring")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--project-length", type=int, default=131072)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/context_parallel.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/context_parallel.png")
    parser.add_argument(
        "--project-only",
        action="store_true",
        help="skip the measurements: projection at the assumed rate only",
    )
    args = parser.parse_args()
    if args.project_only:
        projected = [r for r in project(args.project_length, None) if r["compute_rate"] == "assumed GPU"]
        write(args, {"measured": None, "projection_rows": projected})
        plot(projected, args.plot)
        print(f"wrote {args.out} and {args.plot}")
        return

    model = load_model(args.model)
    if args.model == RANDOM_MODEL:
        ids = torch.randint(3, 4096, (args.length,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        task = get_task("passkey")
        prompt = task.samples(token_counter(model), args.length, 1, seed=0, depths=[0.5])[0].prompt
        ids = encode(model, prompt)
    torch.set_num_threads(2)
    tokensift.generate(model, ids[:256], max_new_tokens=1)  # warm-up
    dense = [tokensift.generate(model, ids, max_new_tokens=1).stats for _ in range(args.repeats)]
    baseline = {
        "prefill_seconds": statistics.median(s.prefill_seconds for s in dense),
        "kv_bytes_peak": dense[0].kv_bytes_peak,
        "note": "single process, tokensift attention (SDPA), 2 threads",
    }
    print(
        f"{model.name}, {len(ids)} tokens; single-process dense prefill {baseline['prefill_seconds']:.2f}s",
        flush=True,
    )
    schedules = args.schedules.split(",")
    measured = []
    for world in (int(p) for p in args.parallel.split(",")):
        measured += measure(model, ids, world, schedules, args.repeats)
    rates = [
        p["attention_flops_per_second"]
        for m in measured
        for p in m["ranks"]
        if p["attention_flops_per_second"]
    ]
    cpu_rate = statistics.median(rates)
    projected = project(args.project_length, cpu_rate)
    write(
        args,
        {
            "model": model.name,
            "dtype": str(model.dtype),
            "prompt_tokens": len(ids),
            "single_process_dense": baseline,
            "measured": measured,
            "measured_attention_flops_per_second": cpu_rate,
            "projection_rows": projected,
        },
    )
    plot(projected, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
