"""CompressKV calibration: semantic retrieval heads from needle runs, then per-layer eviction error.

1. Heads. Needle-in-a-haystack runs (our shipped Austen prose as the haystack, a few needle
   sentences, several lengths and depths) decode greedily; at every step whose generated token
   belongs to the needle, each (layer, query head) is credited with the attention mass the current
   query puts on the whole needle span. Runs whose answer has ROUGE-1 recall <= 0.5 against the
   needle are dropped; a head's score is the mean over the kept runs.
2. Layers. On prose and retrieval prompts, each layer's prefill attention output (through o_proj)
   is computed twice, with the full prompt K/V and with the K/V CompressKV would keep at a tiny
   budget, as the paper describes; the relative Frobenius error, summed over samples, is
   L1-normalised per prompt group, averaged over groups and normalised again. The compared rows
   are the prompt's last `window` queries (the observation window): every kept set holds all their
   causal keys' window, so each sees itself, and they are the queries the next token is formed
   from. (The released code, longbench/model/modeling_*_new.py, accumulates the same error in its
   one-query decode branch instead; we follow the paper.)

Substitutions, stated: the paper uses Paul Graham essays and LongBench; neither ships offline, so
the haystacks and prompts come from the Jane Austen novels in the package.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokensift.bench.corpora import austen_books
from tokensift.calibration import Calibrator, positive
from tokensift.errors import TokensiftError
from tokensift.methods.snapkv import pool_scores
from tokensift.models import Model
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import eos_ids, forward
from tokensift.runtime.scores import dense_attention, window_scores

NEEDLES = (
    (
        "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
        "What is the best thing to do in San Francisco?",
    ),
    (
        "The secret ingredient of the famous lemon cake is a spoonful of lavender honey.",
        "What is the secret ingredient of the famous lemon cake?",
    ),
    (
        "Captain Moreau buried the silver compass under the old oak tree near the lighthouse.",
        "Where did Captain Moreau bury the silver compass?",
    ),
)


def rouge1_recall(answer: str, reference: str) -> float:
    """Share of the reference's words (with multiplicity) found in the answer."""
    ref = Counter(re.findall(r"\w+", reference.lower()))
    got = Counter(re.findall(r"\w+", answer.lower()))
    return sum(min(got[w], c) for w, c in ref.items()) / max(1, sum(ref.values()))


def _haystack(model: Model, rng: random.Random, tokens: int) -> list[str]:
    """Consecutive paragraphs of a random novel, about `tokens` long."""
    text = rng.choice(list(austen_books().values()))
    paragraphs = [p for p in text.split("\n\n") if len(p) > 40]
    start = rng.randrange(0, max(1, len(paragraphs) - 2000))
    out, count = [], 0
    for p in paragraphs[start:]:
        out.append(p)
        count += len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) + 2
        if count >= tokens:
            break
    return out


def _chat_ids(model: Model, message: str) -> tuple[list[int], str, list[tuple[int, int]]]:
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
    )
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), text, list(enc["offset_mapping"])


def needle_prompt(model: Model, length: int, depth: float, needle: str, question: str, rng: random.Random):
    """(ids, needle token span) of a haystack prompt with the needle at `depth`."""
    paragraphs = _haystack(model, rng, length)
    at = round(depth * len(paragraphs))
    message = (
        "\n\n".join([*paragraphs[:at], needle, *paragraphs[at:]]) + f"\n\n{question} Answer in one sentence."
    )
    ids, text, offsets = _chat_ids(model, message)
    start = text.index(needle)
    end = start + len(needle)
    span = [i for i, (a, b) in enumerate(offsets) if b > start and a < end and b > a]
    return ids, (span[0], span[-1] + 1)


def detect_heads(model: Model, lengths: list[int], depths: list[float], max_new_tokens: int, seed: int):
    """(head scores (layers, q_heads), runs kept, runs in all)."""
    layers, heads = model.num_layers, int(model.config.num_attention_heads)
    total = torch.zeros(layers, heads, dtype=torch.float64)
    kept, runs = 0, 0
    eos = eos_ids(model)
    grid = [(n, d, nq) for n in lengths for d in depths for nq in NEEDLES]
    for length, depth, (needle, question) in tqdm(grid, desc="compresskv heads", unit="run"):
        rng = random.Random(f"compresskv|{seed}|{length}|{depth}|{needle}")
        ids, (ns, ne) = needle_prompt(model, length, depth, needle, question, rng)
        needle_tokens = set(ids[ns:ne])
        step_mass = torch.zeros(layers, heads, dtype=torch.float64)

        def observe(module, layer, query, keys, values, scale, ns=ns, ne=ne, step_mass=step_mass) -> None:
            q = query[:, :, -1:]  # the query whose output is the next generated token
            probs = window_scores(q, keys, scale)[0]  # (q_heads, n): one query, so its own softmax
            step_mass[layer.index] = probs[:, ns:ne].sum(-1).double().cpu()

        run_score = torch.zeros_like(total)
        cache = TokenCache(model, None)
        cache.observer = observe
        generated: list[int] = []
        with torch.inference_mode():
            logits = forward(model, torch.tensor([ids], device=model.device), cache)[0, -1]
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                if token in eos:
                    break
                if token in needle_tokens:
                    run_score += step_mass
                generated.append(token)
                logits = forward(model, torch.tensor([[token]], device=model.device), cache)[0, -1]
        runs += 1
        if rouge1_recall(model.tokenizer.decode(generated, skip_special_tokens=True), needle) > 0.5:
            total += run_score
            kept += 1
    if kept == 0:
        raise TokensiftError(
            f"no needle run of {model.name} passed the ROUGE-1 filter; try shorter --lengths"
        )
    return total / kept, kept, runs


def layer_errors(
    model: Model,
    heads: list[list[int]],
    prompts: dict[str, list[list[int]]],
    budget: int,
    window: int,
    first_k: int,
) -> list[float]:
    """Per-layer relative error of the prefill attention output (through o_proj) when only
    CompressKV's `budget` tokens are kept, on the prompt's last `window` queries (L1-normalised)."""
    layers = model.num_layers
    per_group = []
    for group, samples in prompts.items():
        errors = torch.zeros(layers, dtype=torch.float64)
        for ids in tqdm(samples, desc=f"compresskv layers ({group})", unit="prompt"):

            def observe(module, layer, query, keys, values, scale, errors=errors) -> None:
                n = keys.shape[2]
                if query.shape[2] <= window or n <= budget:
                    return  # only a prompt longer than the budget is compressed
                # What CompressKV keeps in this layer: its heads' votes from the window, pooled.
                votes = window_scores(query[:, :, -window:], keys, scale)[
                    :, heads[layer.index][:first_k], : n - window
                ]
                score = pool_scores(votes, 5, "avg").mean(dim=1)[0]
                top = score.topk(budget - window).indices.sort().values
                index = torch.cat([top, torch.arange(n - window, n, device=top.device)])
                # The window's rows are the last of both key sets: causal by shape in each.
                rows = query[:, :, -window:]
                full = dense_attention(rows, keys, values, scale)
                part = dense_attention(rows, keys[:, :, index], values[:, :, index], scale)
                o_full = module.o_proj(full.transpose(1, 2).reshape(1, window, -1))
                o_part = module.o_proj(part.transpose(1, 2).reshape(1, window, -1))
                errors[layer.index] += float((o_part - o_full).norm() / (o_full.norm() + 1e-5))

            cache = TokenCache(model, None)
            cache.observer = observe
            with torch.inference_mode():
                forward(model, torch.tensor([ids], device=model.device), cache)
        if not float(errors.sum()) > 0:
            raise TokensiftError(
                f"compresskv layer profile measured no error: are the prompts ({group}) longer than "
                f"--profile-budget {budget}?"
            )
        per_group.append(errors / errors.sum())
    mean = torch.stack(per_group).mean(0)
    return (mean / mean.sum()).tolist()


def _profile_prompts(model: Model, samples: int, length: int, seed: int) -> dict[str, list[list[int]]]:
    rng = random.Random(f"compresskv-profile|{seed}")
    prose, retrieval = [], []
    for i in range(samples):
        paragraphs = _haystack(model, rng, length)
        prose.append(_chat_ids(model, "Continue this story.\n\n" + "\n\n".join(paragraphs))[0])
        needle, question = NEEDLES[i % len(NEEDLES)]
        retrieval.append(needle_prompt(model, length, rng.random(), needle, question, rng)[0])
    return {"prose": prose, "retrieval": retrieval}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="1024,2048,3072", help="needle-run prompt lengths in tokens")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1]")
    parser.add_argument(
        "--max-new-tokens", type=int, default=50, help="greedy steps per needle run (paper: 50)"
    )
    parser.add_argument(
        "--profile-samples", type=int, default=3, help="prompts per group for the layer profile"
    )
    parser.add_argument("--profile-length", type=int, default=1536, help="tokens per profile prompt")
    parser.add_argument(
        "--profile-budget", type=int, default=32, help="tiny budget of the error profile (paper: 32)"
    )
    parser.add_argument(
        "--reuse-heads",
        type=Path,
        default=None,
        help="keep this artefact's retrieval heads (skip the needle runs) and measure the layer profile",
    )
    parser.add_argument("--seed", type=int, default=0)


def run(model: Model, args: argparse.Namespace) -> dict[str, Any]:
    if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
        raise TokensiftError(
            f"compresskv calibration needs an instruct model with a chat template; {model.name} has none"
        )
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        depths = [float(x) for x in args.depths.split(",")]
    except ValueError:
        raise TokensiftError("--lengths and --depths take comma-separated numbers") from None
    positive(args, "max_new_tokens", "profile_samples", "profile_length", "profile_budget")
    if min(lengths) < 1 or not all(0.0 <= d <= 1.0 for d in depths):
        raise TokensiftError(f"--lengths must be positive and --depths in [0, 1], got {lengths} and {depths}")
    if max(lengths) + args.max_new_tokens + 64 > model.context_length:
        raise TokensiftError(f"--lengths exceed {model.name}'s context of {model.context_length} tokens")
    window, first_k = 8, 4
    if not window < args.profile_budget < args.profile_length:
        raise TokensiftError(
            f"--profile-budget must lie between the window ({window}) and --profile-length "
            f"({args.profile_length}), got {args.profile_budget}"
        )
    if args.reuse_heads is not None:
        from tokensift.calibration import load_artefact

        earlier = load_artefact("compresskv", model, args.reuse_heads)
        heads = {k: earlier[k] for k in ("heads", "head_scores", "needle_runs") if k in earlier}
        heads["heads_from"] = earlier.get("command", str(args.reuse_heads))
    else:
        head_scores, kept, runs = detect_heads(model, lengths, depths, args.max_new_tokens, args.seed)
        heads = {
            "heads": head_scores.argsort(dim=-1, descending=True).tolist(),
            "head_scores": [[round(float(s), 6) for s in row] for row in head_scores],
            "needle_runs": {
                "kept": kept,
                "total": runs,
                "lengths": lengths,
                "depths": depths,
                "needles": len(NEEDLES),
            },
        }
    prompts = _profile_prompts(model, args.profile_samples, args.profile_length, args.seed)
    scores = layer_errors(model, heads["heads"], prompts, args.profile_budget, window, first_k)
    return {
        **heads,
        "layer_scores": [round(s, 6) for s in scores],
        "profile": {
            "groups": list(prompts),
            "samples_per_group": args.profile_samples,
            "length": args.profile_length,
            "budget": args.profile_budget,
            "stage": "prefill: the last `window` prompt queries, full vs compressed K/V",
            "window": window,
            "first_k": first_k,
        },
        "substitutions": "Austen prose replaces Paul Graham essays (heads) and LongBench (layer profile)",
    }


CALIBRATOR = Calibrator(
    name="compresskv",
    help="find semantic retrieval heads and the per-layer eviction-error profile",
    add_arguments=add_arguments,
    run=run,
    keys=("heads", "layer_scores"),
)
