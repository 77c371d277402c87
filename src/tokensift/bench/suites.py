"""Named bench suites for `tokensift bench --suite NAME` (`--preset` is the older name)."""

from __future__ import annotations

import dataclasses

from tokensift.bench.config import BenchConfig
from tokensift.bench.tasks import RULER_TASKS, TASKS
from tokensift.errors import TokensiftError

BASELINES = ["dense", "streaming_llm:budget=0.25", "snapkv:budget=0.25", "h2o:budget=0.25"]
# Ten needle depths, one sample each: the depth x length heatmap and ten samples per task and length.
TEN_DEPTHS = [round(i / 9, 3) for i in range(10)]

# kvpress's leaderboard protocol: compression ratios are the fraction of the KV cache removed.
LEADERBOARD_RATIOS = (0.25, 0.5, 0.75, 0.875)
LEADERBOARD_EVICTORS = (
    "streaming_llm",
    "h2o",
    "keyformer",
    "snapkv",
    "compresskv",
    "adaptive(snapkv)",
    "adaptive(compresskv)",
    "tova",
    "knorm",
    "pyramidkv",
    "keydiff",
)


def _at_ratios(methods: tuple[str, ...], ratios: tuple[float, ...]) -> list[str]:
    from tokensift.methods.spec import with_compression_ratio

    return [with_compression_ratio(m, r) for m in methods for r in ratios]


SUITES: dict[str, BenchConfig] = {
    # The quick look of `make demo`: passkey at three depths under four methods.
    "demo": BenchConfig(
        tasks=["passkey"],
        methods=list(BASELINES),
        lengths=[2048, 4096],
        samples=3,
        depths=[0.1, 0.5, 0.9],
        suite="demo",
    ),
    # Every RULER task we can build offline (11 of 13: the QA pair needs SQuAD/HotpotQA downloads) at
    # 2k and 4k, 10 samples each; depth-swept tasks spread their 10 samples over 10 depths.
    "ruler-lite": BenchConfig(
        tasks=list(RULER_TASKS),
        methods=["dense", "snapkv:budget=0.25"],
        lengths=[2048, 4096],
        samples=10,
        depths=list(TEN_DEPTHS),
        depth_samples=1,
        suite="ruler-lite",
        # bf16 halved prefill time on the AMD EPYC this was tuned on but is slower than fp32 on some
        # Intel Xeons with avx512_bf16: "auto" measures it once per machine (tokensift.dtype_probe).
        # --dtype float32 or bfloat16 overrides it.
        dtype="auto",
    ),
    # kvpress's leaderboard protocol on a model that retrieves: every offline RULER task at 4k, ten
    # samples (ten depths for the needle tasks), every eviction method at the four ratios, both
    # protocols, plus dense. Resumable; many hours on 2 CPU cores (see the README).
    "leaderboard": BenchConfig(
        tasks=list(RULER_TASKS),
        methods=["dense", *_at_ratios(LEADERBOARD_EVICTORS, LEADERBOARD_RATIOS)],
        lengths=[4096],
        model="qwen2.5-coder-0.5b",
        samples=10,
        depths=list(TEN_DEPTHS),
        depth_samples=1,
        suite="leaderboard",
        protocol="both",
        dtype="auto",
        batch_decode=True,  # 45 plans per cell: one forward per decode step serves them all
    ),
    # The leaderboard's second table: sparse decoding keeps the whole cache and attends, per decode
    # step, to the same fractions of the prompt that the evictors keep (1 - ratio).
    "leaderboard-sparse": BenchConfig(
        tasks=list(RULER_TASKS),
        methods=[
            "dense",
            *(
                f"{m}:budget={1 - r:g}"
                for m in ("quest", "tokenselect", "tidaldecode", "hip")
                for r in LEADERBOARD_RATIOS
            ),
        ],
        lengths=[4096],
        model="qwen2.5-coder-0.5b",
        samples=10,
        depths=list(TEN_DEPTHS),
        depth_samples=1,
        suite="leaderboard-sparse",
        dtype="auto",
        batch_decode=True,
    ),
    # Every task family at 1k, 2k and 4k under the four baseline methods. Hours on 2 CPU cores.
    "full": BenchConfig(
        tasks=[t for t in TASKS if t != "passkey_classic"],
        methods=list(BASELINES),
        lengths=[1024, 2048, 4096],
        samples=10,
        depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        depth_samples=2,
        suite="full",
    ),
}


def get_suite(name: str) -> BenchConfig:
    """A fresh copy of a suite's configuration (safe to modify)."""
    if name not in SUITES:
        raise TokensiftError(f"unknown suite {name!r}: known suites are {', '.join(SUITES)}")
    return dataclasses.replace(
        SUITES[name],
        tasks=list(SUITES[name].tasks),
        methods=list(SUITES[name].methods),
        lengths=list(SUITES[name].lengths),
        depths=list(SUITES[name].depths),
    )
