"""ZeroTuning calibration: head profiling, head selection and a gamma sweep on a calibration split.

1. Profile. For every query head of the profiled layers, the objective with gamma = 0.5 and with
   gamma = 2 on that head alone, against the unmodified model (the official demo's up- and
   down-effective heads).
2. Select. Up heads: those whose objective rose with gamma = 2 (best first, at most `--max-heads`);
   down heads: those whose objective rose with gamma = 0.5.
3. Sweep. gamma over the official grid `numpy.arange(rate_min, rate_max + rate_step / 2, rate_step)`:
   a gamma above 1 scales the up heads, below 1 the down heads, 1 is the unmodified model; the best
   gamma on the calibration split wins (ties go to the gamma nearest 1), so the artefact never scores
   below the unmodified model on the data it was calibrated on.

Objectives. `accuracy`: the share of prompts whose next token (greedy, over the whole vocabulary)
begins the gold label, ties broken by the mean log-probability of the gold label's first token.
`entropy` (unsupervised; labels unused): minus the mean entropy, in nats, of the next-token
distribution at the answer position.

Prompts are raw text by default (no chat template), as the official evaluation feeds them; `--chat`
wraps them in the model's template. Each forward is one prefill through tokensift's runtime with the
candidate per-head bias, so the calibration measures what the method runs; the candidate tables of
one prompt run as the rows of one batch.
Only the `calibration` split of the tasks is used; benchmarks score the disjoint `test` split.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokensift.bench.tasks import get_task
from tokensift.bench.tasks.classification import LabelTask
from tokensift.calibration import Calibrator
from tokensift.errors import TokensiftError
from tokensift.methods.base import BiasMethod
from tokensift.methods.zerotuning import Table, parse_layers
from tokensift.models import Model
from tokensift.runtime.cache import TokenCache, TokenLayer
from tokensift.runtime.generate import encode, forward

DEFAULT_TASKS = "sentiment,topic"
PROFILE_GAMMAS = (0.5, 2.0)


def label_tokens(model: Model, label: str) -> set[int]:
    """First token ids with which the model may begin `label` (as is, capitalised, after a space)."""
    out = set()
    for variant in (label, label.capitalize(), " " + label, " " + label.capitalize()):
        ids = model.tokenizer.encode(variant, add_special_tokens=False)
        if ids and model.tokenizer.decode(ids[:1]).strip():  # a bare space names no label
            out.add(int(ids[0]))
    return out


class Prompts:
    """The calibration prompts: token ids, gold first tokens; and a scorer for a per-head table."""

    def __init__(
        self, model: Model, tasks: list[str], samples: int, seed: int, batch: int = 16, raw: bool = True
    ):
        self.model = model
        self.batch = batch
        self.ids: list[list[int]] = []
        self.gold: list[set[int]] = []
        for spec in tasks:
            task = get_task(f"{spec}:split=calibration")
            if not isinstance(task, LabelTask):
                raise TokensiftError(f"zerotuning calibrates on labelled classification tasks, not {spec!r}")
            firsts = {label: label_tokens(model, label) for label in task.labels}
            clash = [a for a in task.labels for b in task.labels if a < b and firsts[a] & firsts[b]]
            if clash:
                raise TokensiftError(f"{spec}: labels share a first token in {model.name}'s tokenizer")
            for sample in task.samples(lambda text, prefix: 0, 0, samples, seed):
                self.ids.append(encode(model, sample.prompt, raw=raw, answer_prefix=sample.answer_prefix))
                self.gold.append(firsts[sample.answer])
        self.forwards = 0

    def logits(self, tables: list[Table]) -> list[list[torch.Tensor]]:
        """Next-token logits of every prompt under every table: [table][prompt] -> (vocab,).

        The tables run as the rows of one batch per prompt (the prompt repeated), each row with its
        own bias, so a profile costs one batched forward per prompt instead of one per head.
        """
        device = next(self.model.model.parameters()).device
        config = self.model.model.config.get_text_config(decoder=True)
        plan = _Rows(tables, self.model.num_layers, int(config.num_attention_heads))
        out: list[list[torch.Tensor]] = [[] for _ in tables]
        with torch.inference_mode():
            for ids in self.ids:
                for start in range(0, len(tables), self.batch):
                    rows = plan.rows(start, start + self.batch)
                    batch = torch.tensor([ids], device=device).expand(len(rows.tables), -1)
                    logits = forward(self.model, batch, TokenCache(self.model, rows))[:, -1].float()
                    for i, row in enumerate(logits):
                        out[start + i].append(row)
                self.forwards += len(tables)
        return out

    def score(self, tables: list[Table], objective: str) -> list[dict[str, float]]:
        """The objective (higher is better) and its parts for the model under each table."""
        return [self._score(logits, objective) for logits in self.logits(tables)]

    def _score(self, logits: list[torch.Tensor], objective: str) -> dict[str, float]:
        logp = [torch.log_softmax(x, dim=-1) for x in logits]
        entropy = float(np.mean([-(p.exp() * p).sum().item() for p in logp]))
        correct = [int(x.argmax()) in gold for x, gold in zip(logits, self.gold, strict=True)]
        gold_logp = [torch.logsumexp(p[list(g)], 0).item() for p, g in zip(logp, self.gold, strict=True)]
        accuracy, mean_logp = float(np.mean(correct)), float(np.mean(gold_logp))
        key = -entropy if objective == "entropy" else accuracy + 1e-6 * max(-1e5, mean_logp)
        return {"objective": key, "accuracy": accuracy, "gold_logprob": mean_logp, "entropy": entropy}


@dataclass
class _Rows(BiasMethod):
    """Calibration only (not registered): one per-head gamma table per batch row."""

    name = "zerotuning-rows"
    tables: list[Table] = field(default_factory=list)
    num_layers: int = 0
    q_heads: int = 0

    def __post_init__(self) -> None:
        logs = torch.zeros(len(self.tables), self.num_layers, self.q_heads, 1)
        for row, table in enumerate(self.tables):
            for layer, heads in table.items():
                for head, gamma in heads.items():
                    logs[row, layer, head, 0] = math.log(gamma)
        self.logs = logs

    def rows(self, start: int, stop: int) -> _Rows:
        return _Rows(self.tables[start:stop], self.num_layers, self.q_heads)

    def key_bias(self, layer: TokenLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
        logs = self.logs[:, layer.index]
        if not bool(logs.any()):
            return None
        return torch.zeros(1, dtype=torch.long), logs


def gamma_grid(rate_min: float, rate_max: float, rate_step: float) -> list[float]:
    """The official sweep: numpy.arange(min, max + step / 2, step) after rounding to 2 decimals."""
    if rate_step <= 0 or rate_min <= 0 or rate_max < rate_min:
        raise TokensiftError("zerotuning sweep needs 0 < rate_min <= rate_max and rate_step > 0")
    lo, hi, step = round(rate_min, 2), round(rate_max, 2), round(rate_step, 2)
    return [round(float(g), 4) for g in np.arange(lo, hi + step / 2, step)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=DEFAULT_TASKS, help="labelled task(s), comma-separated")
    parser.add_argument("--objective", choices=("accuracy", "entropy"), default="accuracy")
    parser.add_argument("--samples", type=int, default=16, help="calibration prompts per task")
    parser.add_argument("--layers", default="early", help="layers to profile: all, early or 0-3/7")
    parser.add_argument("--max-heads", type=int, default=8, help="heads kept per direction (up, down)")
    parser.add_argument("--rate-min", type=float, default=0.25)
    parser.add_argument("--rate-max", type=float, default=3.0)
    parser.add_argument("--rate-step", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=16, help="head variants per batched forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap prompts in the chat template (default: raw, as the official code)",
    )


def run(model: Model, args: argparse.Namespace) -> dict[str, Any]:
    if model.tokenizer is None:
        raise TokensiftError("zerotuning calibration needs a model with a tokenizer")
    if args.samples < 1 or args.max_heads < 1:
        raise TokensiftError("--samples and --max-heads must be >= 1")
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    grid = gamma_grid(args.rate_min, args.rate_max, args.rate_step)
    config = model.model.config.get_text_config(decoder=True)
    q_heads = int(config.num_attention_heads)
    layers = parse_layers(args.layers, model.num_layers)
    prompts = Prompts(model, tasks, args.samples, args.seed, max(1, args.batch), raw=not args.chat)

    baseline = prompts.score([{}], args.objective)[0]
    cells = [(gamma, layer, head) for gamma in PROFILE_GAMMAS for layer in layers for head in range(q_heads)]
    profiled = prompts.score([{layer: {head: gamma}} for gamma, layer, head in cells], args.objective)
    effects: dict[str, list[list[float] | None]] = {str(g): [None] * model.num_layers for g in PROFILE_GAMMAS}
    for (gamma, layer, head), result in zip(cells, profiled, strict=True):
        row = effects[str(gamma)][layer]
        if row is None:
            row = effects[str(gamma)][layer] = [0.0] * q_heads
        row[head] = result["objective"] - baseline["objective"]

    def ranked(gamma: float) -> list[list[int]]:
        rows = effects[str(gamma)]
        cells = [(v, layer, head) for layer in layers for head, v in enumerate(rows[layer] or []) if v > 0]
        return [[layer, head] for _, layer, head in sorted(cells, reverse=True)[: args.max_heads]]

    up, down = ranked(2.0), ranked(0.5)
    heads_for = {g: up if g > 1 else down if g < 1 else [] for g in grid}
    tables = [{} for _ in grid]
    for table, gamma in zip(tables, grid, strict=True):
        for layer, head in heads_for[gamma]:
            table.setdefault(layer, {})[head] = gamma
    swept = prompts.score([t for t in tables if t], args.objective)
    results = iter(swept)
    sweep = [
        {"gamma": g, "heads": len(heads_for[g]), **(next(results) if t else baseline)}
        for g, t in zip(grid, tables, strict=True)
    ]
    best = max(sweep, key=lambda r: (r["objective"], -abs(math.log(r["gamma"]))))
    gamma = best["gamma"] if best["heads"] else 1.0
    heads = up if gamma > 1 else down if gamma < 1 else []
    return {
        "objective": args.objective,
        "tasks": tasks,
        "split": "calibration",
        "samples_per_task": args.samples,
        "seed": args.seed,
        "chat_template": bool(args.chat),
        "layers_profiled": layers,
        "profile_gammas": list(PROFILE_GAMMAS),
        "baseline": baseline,
        "head_effects": effects,
        "up_heads": up,
        "down_heads": down,
        "grid": grid,
        "sweep": sweep,
        "gamma": gamma,
        "calibrated": best,
        "table": [[layer, head, gamma] for layer, head in heads],
        "forwards": prompts.forwards,
    }


CALIBRATOR = Calibrator(
    name="zerotuning",
    help="ZeroTuning: profile heads, select them, sweep gamma on a calibration split",
    add_arguments=add_arguments,
    run=run,
)
