"""Context parallelism: P gloo processes on this machine give single-process dense's logits.

Each launch spawns P processes (torch.multiprocessing, a free loopback port) that run several
generations, compared with single-process `generate` on the same tiny model: prefill and 32 decode
steps within 1e-5 (fp32), both schedules, lengths that do not divide by 2P, split or gathered decode
cache, and SnapKV composed (reference: single-process SnapKV with the same parameters, which keeps
per KV head the `budget` tokens with the highest pooled window votes; the split run must keep
exactly those and so give the same logits).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tokensift
from tests.conftest import prompt_ids, tiny_model
from tokensift.distributed import generate_context_parallel
from tokensift.distributed.blocks import attend_block, merge
from tokensift.distributed.costmodel import Shape, bytes_per_rank, layer_seconds
from tokensift.distributed.partition import rank_length, rank_positions, visible_rows
from tokensift.errors import TokensiftError

STEPS = 33  # the prefill's logits plus 32 decode steps
SNAPKV = "snapkv:budget=20,window_size=4,kernel_size=3,pooling=avg"

# (schedule, prompt length, method, gather after prefill)
CASES = {
    2: [
        ("ring", 37, "dense", False),
        ("tokenring", 37, "dense", False),
        ("tokenring", 41, SNAPKV, False),
        ("ring", 41, SNAPKV, True),
    ],
    4: [
        ("ring", 45, "dense", False),
        ("tokenring", 45, "dense", False),
        ("ring", 43, SNAPKV, False),
        ("tokenring", 43, SNAPKV, True),
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))


def cases_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world, port, 60)
    model = tiny_model("llama")
    for i, (schedule, n, method, gather) in enumerate(CASES[world]):
        result = generate_context_parallel(
            model,
            prompt_ids(n),
            method,
            parallel=world,
            schedule=schedule,
            gather_after_prefill=gather,
            max_new_tokens=STEPS,
            ignore_eos=True,
            return_logits=True,
        )
        assert result.logits is not None
        torch.save(
            {
                "logits": torch.stack(result.logits),
                "tokens": result.token_ids,
                "stats": result.stats.to_dict(),
            },
            Path(out) / f"case{i}_rank{rank}.pt",
        )
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world: int, tmp_path: Path) -> None:
    mp.spawn(cases_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    model = tiny_model("llama")
    for i, (schedule, n, method, gather) in enumerate(CASES[world]):
        ref = tokensift.generate(
            model, prompt_ids(n), method, max_new_tokens=STEPS, ignore_eos=True, return_logits=True
        )
        assert ref.logits is not None
        expected = torch.stack(ref.logits)
        for rank in range(world):
            got = torch.load(tmp_path / f"case{i}_rank{rank}.pt")
            label = f"P={world} {schedule} n={n} {method} gather={gather} rank {rank}"
            assert got["tokens"] == ref.token_ids, label
            assert got["logits"].shape == expected.shape, label
            err = (got["logits"] - expected).abs().max().item()
            assert err <= 1e-5, f"{label}: max |logit difference| {err:.2e}"
            stats = got["stats"]
            counters = stats["counters"]
            kv_peaks = [counters[f"cp_rank{r}_kv_bytes_prefill"] for r in range(world)]
            dense_prompt = n * model.kv_bytes_per_token
            if method == "dense":
                # Each rank held its own slice of the prompt's KV: its share of n, not n.
                for r in range(world):
                    assert kv_peaks[r] == rank_length(n, world, r) * model.kv_bytes_per_token, label
                assert sum(kv_peaks) == dense_prompt, label
            # The messages the schedule sent are exactly those the communication model counts.
            shape = Shape(4, 2, 16, 4)  # the tiny model: 4 query heads, 2 KV heads, head_dim 16, fp32
            predicted = bytes_per_rank(n, world, shape, schedule)
            for r in range(world):
                assert counters[f"cp_rank{r}_p2p_bytes"] == predicted[r] * model.num_layers, label
            else:
                assert stats["tokens_evicted"] == ref.stats.tokens_evicted, label
                assert stats["applied"], label


def failing_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world, port, 20)
    if rank == 1:
        os._exit(3)  # a rank dies right after joining
    try:
        generate_context_parallel(tiny_model("llama"), prompt_ids(40), parallel=world, max_new_tokens=4)
    except TokensiftError as exc:
        Path(out, "error.txt").write_text(str(exc))
        os._exit(2)
    except BaseException:  # anything else is a test failure: record it
        Path(out, "error.txt").write_text("unexpected: " + traceback.format_exc())
        os._exit(1)
    os._exit(0)


def test_rank_failure_ends_the_others(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=failing_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(alive), "a surviving rank hung after its peer exited"
    assert procs[1].exitcode == 3
    assert procs[0].exitcode == 2
    message = (tmp_path / "error.txt").read_text()
    assert message.startswith("context parallel rank 0/2:") and "peer rank has exited" in message


def test_block_attention_and_merge_are_exact() -> None:
    """Splitting the keys anywhere and merging by LSE gives SDPA's causal output."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 29, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    pos = torch.arange(29)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out, lse = attend_block(q, k[:, :, :11], v[:, :, :11], pos, pos[:11], 0.35355339, max_elements=64)
    rest = attend_block(q, k[:, :, 11:], v[:, :, 11:], pos, pos[11:], 0.35355339, max_elements=64)
    out, lse = merge(out, lse, *rest)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-5)
    assert torch.isinf(rest[1][..., :11]).all()  # rows that see none of those keys


def test_zigzag_partition() -> None:
    n, parts = 23, 3
    every = torch.cat([rank_positions(n, parts, r) for r in range(parts)])
    assert sorted(every.tolist()) == list(range(n))
    assert [rank_length(n, parts, r) for r in range(parts)] == [
        7,
        8,
        8,
    ]  # chunks of 4,4,4,4,4,3: rank r holds r and 5-r
    # A later rank's queries all see an earlier rank's front chunk; an earlier rank's front chunk
    # sees nothing of a later rank, so only its back chunk is sent there.
    assert visible_rows(n, parts, 2, 0) == 0
    assert visible_rows(n, parts, 0, 2) == rank_positions(n, parts, 0).tolist().index(20)
    with pytest.raises(TokensiftError, match="at least 6 tokens"):
        rank_positions(5, parts, 0)


def test_refuses_methods_it_cannot_distribute() -> None:
    with pytest.raises(TokensiftError, match="h2o does not run with --context-parallel"):
        generate_context_parallel(tiny_model("llama"), prompt_ids(40), "h2o:budget=16", parallel=2)


def test_cli_needs_torchrun() -> None:
    from tokensift.cli import main

    env_world = os.environ.pop("WORLD_SIZE", None)
    try:
        assert main(["generate", "--context-parallel", "2", "--model", "missing-model", "x"]) == 2
    finally:
        if env_world is not None:
            os.environ["WORLD_SIZE"] = env_world


def save_word_model(path: Path) -> list[str]:
    """The tiny model with a word-level tokenizer ("w3" -> id 3), saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama")
    vocab = {f"w{i}": i for i in range(model.model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2", bos_token="w1")
    model.model.save_pretrained(path)
    fast.save_pretrained(path)
    return [f"w{i}" for i in prompt_ids(45)]


def test_torchrun_generate(tmp_path: Path) -> None:
    """The real launcher: `torchrun -m tokensift generate --context-parallel 2` equals plain generate."""
    words = save_word_model(tmp_path / "model")
    prompt = tmp_path / "long.txt"
    prompt.write_text(" ".join(words))
    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["--model", str(tmp_path / "model"), "--prompt-file", str(prompt), "--raw", "--json"]
    # The question is appended after the split prefill: a multi-token forward over the split cache.
    common += ["--max-new-tokens", "8", "--question", "w7 w9 w11"]
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "tokensift", "generate"]
    cmd += ["--context-parallel", "2", "--cp-schedule", "tokenring", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout)
    single = subprocess.run(
        [sys.executable, "-m", "tokensift", "generate", *common], capture_output=True, text=True, timeout=120
    )
    assert single.returncode == 0, single.stderr[-2000:]
    want = json.loads(single.stdout)
    assert got["token_ids"] == want["token_ids"]
    assert got["stats"]["counters"]["cp_ranks"] == 2
    assert got["stats"]["counters"]["question_tokens"] == want["stats"]["counters"]["question_tokens"] > 0
    assert got["stats"]["kv_bytes_peak"] < want["stats"]["kv_bytes_peak"]


def test_cost_model() -> None:
    """Ring sends K/V one way; TokenRing sends queries one way and results the other, on separate
    links. On slow links at many ranks TokenRing wins with MHA (its per-link bytes are about half of
    ring's), and loses with 4:1 GQA (queries and results outweigh the shared K/V)."""
    mha, gqa = Shape(32, 32, 128, 2), Shape(32, 8, 128, 2)
    n = 1 << 17

    def ms(shape: Shape, parts: int, schedule: str, bandwidth: float) -> float:
        return layer_seconds(n, parts, shape, schedule, 400e12, bandwidth)["seconds"] * 1e3

    assert ms(mha, 8, "tokenring", 25e9) < 0.7 * ms(mha, 8, "ring", 25e9)
    assert ms(gqa, 64, "ring", 25e9) < 0.7 * ms(gqa, 64, "tokenring", 25e9)
    # Few ranks on fast links: compute-bound, both schedules within a few percent of compute alone.
    fast = layer_seconds(n, 2, mha, "ring", 400e12, 400e9)
    assert fast["exposed_comm_seconds"] == 0
    assert layer_seconds(n, 2, mha, "tokenring", 400e12, 400e9)["seconds"] < 1.05 * fast["seconds"]
