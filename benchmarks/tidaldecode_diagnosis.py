"""TidalDecode diagnosis: is the reused selection broken, or only weaker at small budgets?

    python benchmarks/tidaldecode_diagnosis.py [--model smollm2-135m] [--length 4096]
        [--prompts 5] [--seed 7301] [--mass-steps 16] [--budgets 128 256 512 1024 2048]
        [--new-tokens 64] [--specs ...] [--dtype float32]
        [--json benchmarks/results/tidaldecode_diagnosis.json]

Prompts are open continuations: windows of `--length` tokens of the shipped Jane Austen novels (the
`perplexity` task's generator, raw text, no chat template), seeds the earlier sparse-decode runs did
not use. Every prompt is prefilled once (`runtime.shared_prefill`) and each decoding reuses it.

Part 1, attention mass. Dense greedy decoding for `--mass-steps` steps; at every decode step and
layer an observer computes the dense attention probabilities of each query head and, for each layer
after the first selection layer, the share of that mass falling on the tokens a selection rule picked
at the last selection layer (layer `start`, then the re-selection layer) of the same step:

    query        top-k logits per query head (the reference's HF code; tokensift's former default)
    query+fixed  the same with the current token, sinks and a recent window always included
    kv           one top-k per KV head from the group's maximum logit, fixed tokens included
    shared       one top-k for all heads from the head-summed attention probabilities, fixed included
    own-layer    top-k of the layer's own probabilities per query head (an oracle bound: what
                 selecting at every layer could capture; a per-layer method such as Quest is below it)

It also reports how often the current token and the first token (the attention sink) are missing
from the `query` selection, and the mass they carry in the layers that reuse it.

Part 2, greedy agreement. Dense and each `--specs` entry at each budget decode `--new-tokens`
greedy tokens (EOS ignored) from the shared prefill; agreement is the length of the common prefix
with dense over `--new-tokens` ("prefix"), and the share of positions holding dense's token
("positional"), both averaged over prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.methods.tidaldecode import TidalDecode
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import Decoding, decode_plain, encode, eos_ids
from tokensift.runtime.shared_prefill import SharedPrefill

RULES = ["query", "query+fixed", "kv", "shared", "own-layer"]
PERSISTENCE = ["query", "shared"]
SPECS = ["tidaldecode", "quest"]


def prompts(model: tokensift.Model, length: int, n: int, seed: int) -> list[list[int]]:
    """`n` raw Austen windows of exactly `length` tokens."""
    assert model.tokenizer is not None
    task = get_task("perplexity")
    out = []
    for sample in task.samples(lambda text, prefix="": len(text) // 4, length, n, seed=seed):
        ids = model.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"][:length]
        out.append([int(t) for t in ids])
    return out


def fixed_slots(n: int, sinks: int, window: int, device: torch.device) -> torch.Tensor:
    """Slots always attended: the first `sinks`, the last `window` (the current token is slot n-1)."""
    first = torch.arange(min(sinks, n), device=device)
    last = torch.arange(max(n - window, min(sinks, n)), n, device=device)
    return torch.cat([first, last])


def top_with_fixed(score: torch.Tensor, k: int, fixed: torch.Tensor) -> torch.Tensor:
    """Top-k slots of score (..., n) after the fixed ones, which are always included (k in all)."""
    score = score.clone()
    score[..., fixed] = float("inf")
    return score.topk(min(k, score.shape[-1]), dim=-1).indices


class MassProbe:
    """Observer of dense decoding: per layer, the dense attention mass each rule's selection captures."""

    def __init__(self, start: int, correction: int, budgets: list[int], sinks: int, window: int):
        self.start, self.correction = start, correction
        self.budgets, self.sinks, self.window = budgets, sinks, window
        self.selection: dict[tuple[str, int], torch.Tensor] = {}
        # (rule, budget, layer) -> captured mass per step (mean over query heads)
        self.mass: dict[tuple[str, int, int], list[float]] = {}
        self.error: dict[tuple[str, int, int], list[float]] = {}
        self.missing: dict[tuple[str, int], list[float]] = {}  # current token / sink absent from `query`
        self.anchor_mass: dict[int, list[float]] = {}  # layer -> mass on current token + first token
        # Persistence: (rule, budget) -> (j, i) -> mass at layer i captured by layer j's own top-k.
        self.pairs: dict[tuple[str, int], dict[tuple[int, int], list[float]]] = {}
        self.own: dict[tuple[str, int], dict[int, torch.Tensor]] = {}

    def __call__(
        self,
        module: Any,
        layer: Any,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scale: float,
    ) -> None:
        if query.shape[2] != 1:
            return
        _b, hq, _, d = query.shape
        hkv, n = keys.shape[1], keys.shape[2]
        rep = hq // hkv
        k = keys.float().repeat_interleave(rep, 1)
        v = values.float().repeat_interleave(rep, 1)
        logits = (query.float() @ k.transpose(-1, -2))[0, :, 0] * scale  # (H_q, n)
        probs = logits.softmax(-1)
        dense_out = torch.einsum("hn,hnd->hd", probs, v[0])
        i = layer.index
        if i < self.start:
            return
        fixed = fixed_slots(n, self.sinks, self.window, query.device)
        if i == self.start:
            self.own = {}
        for budget in self.budgets:
            if budget >= n:
                continue
            for rule in PERSISTENCE:
                if rule == "query":
                    index = logits.topk(budget, dim=-1).indices
                else:
                    index = top_with_fixed(probs.sum(0), budget, fixed).expand(hq, -1)
                earlier = self.own.setdefault((rule, budget), {})
                pairs = self.pairs.setdefault((rule, budget), {})
                for j, chosen in earlier.items():
                    pairs.setdefault((j, i), []).append(float(probs.gather(-1, chosen).sum(-1).mean()))
                earlier[i] = index
        if i > self.start:
            self.anchor_mass.setdefault(i, []).append(float((probs[:, -1] + probs[:, 0]).mean()))
        for budget in self.budgets:
            if budget >= n:
                continue
            # The `own-layer` oracle at every layer after start (selection layers included).
            chosen = {"own-layer": probs.topk(budget, dim=-1).indices}
            if i not in (self.start, self.correction):
                for rule in RULES[:-1]:
                    chosen[rule] = self.selection[(rule, budget)]
            for rule, index in chosen.items():
                if i in (self.start, self.correction) and rule != "own-layer":
                    continue
                captured = probs.gather(-1, index).sum(-1)  # (H_q,)
                self.mass.setdefault((rule, budget, i), []).append(float(captured.mean()))
                sub = logits.gather(-1, index).softmax(-1)
                out = torch.einsum("hm,hmd->hd", sub, v[0].gather(1, index.unsqueeze(-1).expand(-1, -1, d)))
                rel = (out - dense_out).norm(dim=-1) / dense_out.norm(dim=-1)
                self.error.setdefault((rule, budget, i), []).append(float(rel.mean()))
            if i in (self.start, self.correction):
                q_top = logits.topk(budget, dim=-1).indices  # (H_q, k)
                self.selection[("query", budget)] = q_top
                self.missing.setdefault(("current", budget), []).append(
                    float((~(q_top == n - 1).any(-1)).float().mean())
                )
                self.missing.setdefault(("sink", budget), []).append(
                    float((~(q_top == 0).any(-1)).float().mean())
                )
                self.selection[("query+fixed", budget)] = top_with_fixed(logits, budget, fixed)
                kv = top_with_fixed(logits.view(hkv, rep, n).amax(1), budget, fixed)
                self.selection[("kv", budget)] = kv.repeat_interleave(rep, 0)
                shared = top_with_fixed(probs.sum(0), budget, fixed)
                self.selection[("shared", budget)] = shared.expand(hq, -1)


def mass_part(
    model: tokensift.Model, prefills: list[SharedPrefill], args: argparse.Namespace
) -> dict[str, Any]:
    layers = model.model.config.num_hidden_layers
    start, correction = TidalDecode(budget=1).layer_roles(layers)
    probe = MassProbe(start, correction, args.budgets, args.sinks, args.window)
    for pre in prefills:
        with torch.inference_mode():
            cache = TokenCache(model, "dense", prompt_tokens=len(pre.ids))
            logits = pre.fill(cache)
            cache.observer = probe
            decoding = Decoding(model, cache, args.mass_steps, eos=eos_ids(model), ignore_eos=True)
            decode_plain(decoding, logits)
    schedules = []
    for (rule, budget), pairs in probe.pairs.items():
        m = {key: statistics.mean(v) for key, v in pairs.items()}
        for c in [None, *range(start + 1, layers)]:
            sparse = [i for i in range(start + 1, layers) if i != c]
            mean = statistics.mean(m[(start if c is None or i < c else c, i)] for i in sparse)
            schedules.append({"rule": rule, "budget": budget, "correction": c, "mass": mean})
    rows = []
    for (rule, budget, layer), values in sorted(
        probe.mass.items(), key=lambda x: (x[0][1], x[0][0], x[0][2])
    ):
        rows.append(
            {
                "rule": rule,
                "budget": budget,
                "layer": layer,
                "mass": statistics.mean(values),
                "output_error": statistics.mean(probe.error[(rule, budget, layer)]),
            }
        )
    return {
        "start": start,
        "correction": correction,
        "sinks": args.sinks,
        "window": args.window,
        "rows": rows,
        "schedules": schedules,
        "missing": {f"{what}@{budget}": statistics.mean(v) for (what, budget), v in probe.missing.items()},
        "anchor_mass": {str(layer): statistics.mean(v) for layer, v in sorted(probe.anchor_mass.items())},
    }


def agreement_part(
    model: tokensift.Model, prefills: list[SharedPrefill], args: argparse.Namespace
) -> list[dict[str, Any]]:
    dense = [
        tokensift.generate(
            model, p.ids, "dense", max_new_tokens=args.new_tokens, ignore_eos=True, shared=p
        ).token_ids
        for p in prefills
    ]
    rows = []
    for spec in args.specs:
        for budget in args.budgets:
            full = f"{spec}{',' if ':' in spec else ':'}budget={budget}"
            prefix, positional = [], []
            t = time.perf_counter()
            for p, ref in zip(prefills, dense, strict=True):
                out = tokensift.generate(
                    model, p.ids, full, max_new_tokens=args.new_tokens, ignore_eos=True, shared=p
                )
                same = [a == b for a, b in zip(out.token_ids, ref, strict=True)]
                prefix.append(([*same, False]).index(False) / len(ref))
                positional.append(sum(same) / len(ref))
            rows.append(
                {
                    "spec": full,
                    "budget": budget,
                    "prefix_agreement": statistics.mean(prefix),
                    "positional_agreement": statistics.mean(positional),
                    "per_prompt_prefix": prefix,
                    "seconds": time.perf_counter() - t,
                }
            )
            print(
                f"{full}: prefix {statistics.mean(prefix):.2f} positional {statistics.mean(positional):.2f}",
                flush=True,
            )
    return rows


def passkey_part(
    model: tokensift.Model, args: argparse.Namespace, result: dict[str, Any]
) -> list[dict[str, Any]]:
    """Passkey retrieval (chat template, the task's answer prefix) for dense and each spec, one shared
    prefill per prompt; `--passkey-prompts` prompts spread over five depths."""
    task = get_task("passkey")
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    per_depth = max(1, args.passkey_prompts // len(depths))
    samples = task.samples(token_counter(model), args.length, per_depth, seed=args.seed, depths=depths)
    specs = ["dense"] + [f"{s}{',' if ':' in s else ':'}budget={b}" for s in args.specs for b in args.budgets]
    hits: dict[str, list[float]] = {s: [] for s in specs}
    for sample in samples:
        ids = encode(model, sample.prompt, answer_prefix=sample.answer_prefix)
        pre = SharedPrefill.run(model, ids)
        for spec in specs:
            out = tokensift.generate(
                model,
                sample.prompt,
                spec,
                max_new_tokens=sample.max_new_tokens,
                answer_prefix=sample.answer_prefix,
                shared=pre,
            )
            hits[spec].append(task.score(sample, out.text))
        print(
            f"passkey depth {sample.depth}: " + " ".join(f"{s} {hits[s][-1]:.0f}" for s in specs), flush=True
        )
        result["passkey"] = [
            {"spec": s, "passkey": sum(h), "prompts": len(h), "per_prompt": h} for s, h in hits.items()
        ]
        if args.json:  # after every prompt: a long run that is stopped keeps what it measured
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return result["passkey"]


def tables(result: dict[str, Any]) -> str:
    out = []
    mass = result.get("mass")
    if mass:
        budgets = sorted({r["budget"] for r in mass["rows"]})
        layers = sorted({r["layer"] for r in mass["rows"]})
        by = {(r["rule"], r["budget"], r["layer"]): r for r in mass["rows"]}
        out.append(
            f"\nDense attention mass captured per layer (mean over query heads and "
            f"{result['args']['mass_steps']} decode steps x {result['args']['prompts']} prompts); selection "
            f"layers {mass['start']} and {mass['correction']}; fixed = {mass['sinks']} sinks + last "
            f"{mass['window']} tokens (current included). Cells: mass / relative output error.\n"
        )
        for budget in budgets:
            out += [
                f"\nbudget {budget}:\n",
                "| layer | " + " | ".join(RULES) + " | mass on current + first token |",
                "|---|" + "---|" * (len(RULES) + 1),
            ]
            for layer in layers:
                cells = []
                for rule in RULES:
                    r = by.get((rule, budget, layer))
                    cells.append(f"{r['mass']:.2f} / {r['output_error']:.2f}" if r else "selects")
                anchor = mass["anchor_mass"].get(str(layer))
                out.append(
                    f"| {layer} | " + " | ".join(cells) + f" | {'' if anchor is None else f'{anchor:.2f}'} |"
                )
            means = []
            for rule in RULES:
                vals = [r["mass"] for (ru, b, _), r in by.items() if ru == rule and b == budget]
                means.append(f"{statistics.mean(vals):.2f}" if vals else "-")
            out.append("| mean | " + " | ".join(means) + " | |")
        out += [
            "\nRe-selection layer sweep (selection at layer "
            f"{mass['start']}, re-selection at c): mean mass over the sparse layers; best three and the "
            "default\n",
            "| rule | budget | no re-selection | default c | best c (mass) |",
            "|---|---|---|---|---|",
        ]
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in mass.get("schedules", []):
            groups.setdefault((r["rule"], r["budget"]), []).append(r)
        for (rule, budget), rs in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
            none = next(r["mass"] for r in rs if r["correction"] is None)
            default = next(r["mass"] for r in rs if r["correction"] == mass["correction"])
            best = sorted((r for r in rs if r["correction"] is not None), key=lambda r: -r["mass"])[:3]
            out.append(
                f"| {rule} | {budget} | {none:.3f} | {mass['correction']}: {default:.3f} | "
                + ", ".join(f"{r['correction']} ({r['mass']:.3f})" for r in best)
                + " |"
            )
        out.append(
            "\n`query` selections missing the current token / the first token (share of query heads): "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(mass["missing"].items()))
        )
    rows = result.get("agreement")
    if rows:
        out += [
            f"\nGreedy agreement with dense over {result['args']['new_tokens']} new tokens, "
            f"{result['args']['prompts']} prompts:\n",
            "| spec | prefix agreement | positional agreement | per-prompt prefix |",
            "|---|---|---|---|",
        ]
        for r in rows:
            out.append(
                f"| `{r['spec']}` | {r['prefix_agreement']:.2f} | {r['positional_agreement']:.2f} "
                f"| {' '.join(f'{x:.2f}' for x in r['per_prompt_prefix'])} |"
            )
    rows = result.get("passkey")
    if rows:
        out += [
            f"\nPasskey at {result['args']['length']} tokens ({rows[0]['prompts']} prompts, "
            "depths 0.1-0.9):\n",
            "| spec | found | per prompt |",
            "|---|---|---|",
        ]
        for r in rows:
            out.append(
                f"| `{r['spec']}` | {r['passkey']:.0f} / {r['prompts']} "
                f"| {' '.join(f'{x:.0f}' for x in r['per_prompt'])} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=tokensift.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7301, help="held out: earlier runs used seed 0")
    parser.add_argument("--mass-steps", type=int, default=16, help="0: skip part 1")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--specs", nargs="*", default=SPECS, help="none: skip part 2")
    parser.add_argument(
        "--passkey-prompts", type=int, default=0, help="passkey prompts (part 3; replaces parts 1-2)"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--render", default=None, help="print the tables of a saved JSON and exit")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            print(tables(json.load(f)))
        return
    model = tokensift.load(args.model, dtype=args.dtype)
    header = (
        f"model {model.name} ({args.dtype}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(header, flush=True)
    result: dict[str, Any] = {"setup": header, "args": vars(args)}
    t = time.time()
    if args.passkey_prompts:
        passkey_part(model, args, result)
        finish(result, args, header, t)
        return
    prefills = [SharedPrefill.run(model, ids) for ids in prompts(model, args.length, args.prompts, args.seed)]
    print(f"{len(prefills)} prefills in {time.time() - t:.0f} s", flush=True)
    if args.mass_steps:
        result["mass"] = mass_part(model, prefills, args)
        print(tables(result), flush=True)
    if args.specs:
        result["agreement"] = agreement_part(model, prefills, args)
    finish(result, args, header, t)


def finish(result: dict[str, Any], args: argparse.Namespace, header: str, t: float) -> None:
    result["seconds"] = time.time() - t
    text = tables(result)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        with open(args.json.removesuffix(".json") + ".md", "w") as f:
            f.write(f"{header}\n\n`python {' '.join(sys.argv)}`\n{text}\n")


if __name__ == "__main__":
    main()
