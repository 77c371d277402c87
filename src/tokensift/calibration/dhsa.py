"""`tokensift calibrate dhsa`: train DHSA's boundary predictor on the shipped text.

Follows the paper's recipe (the reference `legacy/boundary_predictor`: store_labels.py, train.py,
loss.py): the model reads each training window with exact attention; in every layer, for every gap
after token t, the head-averaged attention that later queries (rows t + w onwards) give to the w keys
left of the gap and to the w keys right of it are compared, and the gap is a boundary when the larger
is at least twice the smaller (soft label sigmoid(2 (log r - log 2)) >= 0.5). One predictor, shared by
all layers, reads each layer's keys and is trained with focal BCE (gamma 2, pos_weight 1.3) over the
gaps at least 2w from either end, with Adam, seed 42.

Not reproduced (see DHSA's docstring): the paper's training data (about 60K long QA and summarising
samples of 512-8K tokens from six Hugging Face datasets, language-filtered) is replaced by windows of
the shipped Jane Austen novels, with one novel held out for validation; its base model (Gemma-2-2B)
by ours; its scale (two epochs over ~60K samples on a GPU, Adam lr 1e-4) by what a shared 2-core CPU
affords in minutes: each Adam step sums the gradients of `--layers-per-step` layers (layer 0, which
the method reads at inference, always among them), each on a random `--crop`-token slice of the
window (the predictor only sees 2w tokens around a gap, so a slice loses nothing but positions), for
`--epochs` passes over the windows, with the learning rate raised to 1e-3 to make up for taking
hundreds of steps instead of tens of thousands.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tokensift.calibration import Calibrator, positive
from tokensift.errors import TokensiftError
from tokensift.methods.base import SparsePrefillMethod
from tokensift.methods.dhsa import BoundaryPredictor, key_features
from tokensift.models import Model
from tokensift.runtime.scores import MAX_CHUNK_ELEMENTS, chunk_rows, dense_attention

WINDOW = 4  # boundary window w (paper: 4)
ALPHA, BETA = 2.0, math.log(2.0)  # soft-label transform: a gap is positive when its ratio r >= 2
GAMMA, POS_WEIGHT = 2.0, 1.3  # focal BCE
LR, SEED = 1e-3, 42  # the paper's lr is 1e-4 with far more steps (see above)


def boundary_ratios(
    query: torch.Tensor, keys: torch.Tensor, scale: float, window: int = WINDOW
) -> torch.Tensor:
    """The label statistic of every gap (L,): max/min of the attention mass that rows t + w.. give the w
    keys left of gap t (t - w + 1..t) and the w keys right of it (t + 1..t + w), head-averaged; 0
    within 2w of either end. Exact attention in row chunks: O(L * n) work, O(chunk * n) memory.

    Mass from rows r >= t + w on key j is colsum(j) minus the rows j..t + w - 1, all within 2w of the
    diagonal, so column sums plus a band of 2w diagonals suffice (no L x L matrix).
    """
    _, hq, length, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    if length != n:
        raise TokensiftError("boundary labels need the whole window in one forward")
    band_width = 2 * window
    device = query.device
    colsum = torch.zeros(n, dtype=torch.float64, device=device)
    band = torch.zeros(
        n, band_width, dtype=torch.float64, device=device
    )  # band[j, e] = mean attention of row j + e on key j
    kt = keys.unsqueeze(2).transpose(-1, -2)
    step = chunk_rows(n, hq, MAX_CHUNK_ELEMENTS)
    cols = torch.arange(n, device=device)
    for r0 in range(0, length, step):
        r1 = min(length, r0 + step)
        qg = query[:, :, r0:r1].reshape(1, hkv, hq // hkv, r1 - r0, d)
        logits = torch.matmul(qg, kt).float().mul_(scale).reshape(hq, r1 - r0, n)
        rows = torch.arange(r0, r1, device=device)
        logits.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
        mean = torch.softmax(logits, dim=-1).mean(0).double()  # (rows, n)
        colsum += mean.sum(0)
        e = torch.arange(band_width, device=device)
        j = rows[:, None] - e[None, :]  # key j of row r at distance e
        ok = j >= 0
        band[j[ok], e.expand_as(j)[ok]] = mean[(rows[:, None] - r0).expand_as(j)[ok], j[ok]]
    # below[j, e] = sum of band[j, :e]: rows j..j + e - 1 on key j.
    below = F.pad(band.cumsum(1), (1, 0))
    t = torch.arange(length, device=device)
    i = torch.arange(window, device=device)

    def mass(first: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
        """Sum over keys j = first + i of the attention from rows t + w onwards."""
        jj = (first[:, None] + i[None, :]).clamp(0, n - 1)
        ee = (t[:, None] + window - jj).clamp(0, band_width)
        return (colsum[jj] - below[jj, ee]).sum(1)

    past = mass(t - window + 1, t)
    future = mass(t + 1, t)
    eps = 1e-6
    ratio = (torch.maximum(past, future) + eps) / (torch.minimum(past, future) + eps)
    valid = (t >= 2 * window - 1) & (t < length - 2 * window)
    return torch.where(valid, ratio, 0.0).float()


def focal_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's focal binary cross-entropy with pos_weight, averaged over the mask."""
    bce = F.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor(POS_WEIGHT), reduction="none"
    )
    prob = torch.sigmoid(logits)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = (1 - p_t).pow(GAMMA) * bce * mask
    return loss.sum() / mask.sum().clamp(min=1)


def targets_and_mask(ratios: torch.Tensor, window: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    length = ratios.shape[-1]
    soft = torch.sigmoid(ALPHA * (torch.log(ratios.clamp(min=1.0) + 1e-6) - BETA))
    mask = torch.zeros(length)
    mask[2 * window - 1 : length - 2 * window] = 1.0
    return (soft >= 0.5).float(), mask


@dataclass
class LabelCapture(SparsePrefillMethod):
    """Records every layer's keys (predictor input) and boundary ratios while the forward itself uses
    exact attention (not registered: it is the calibration, not a method)."""

    name: ClassVar[str] = "dhsa_labels"

    keys: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    ratios: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    layers: frozenset[int] | None = None  # the layers to label (None: all)

    def prefill_attention(self, layer: Any, query: Any, keys: Any, values: Any, scale: float) -> torch.Tensor:
        if self.layers is None or layer.index in self.layers:
            # On the CPU (where the predictor trains); float16 storage keeps memory small.
            self.keys[layer.index] = key_features(keys)[0].half().cpu()
            self.ratios[layer.index] = boundary_ratios(query, keys, scale).cpu()
        return dense_attention(query, keys, values, scale)


def windows(model: Model, length: int, count: int, books: list[str], seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens starting at random paragraphs of the given novels."""
    from tokensift.bench.corpora import austen_books

    assert model.tokenizer is not None
    text = austen_books()
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        book = text[rng.choice(books)]
        starts = [i + 2 for i in range(0, len(book) - length * 6, 97) if book.startswith("\n\n", i)]
        start = rng.choice(starts) if starts else 0
        ids = model.tokenizer(book[start : start + length * 8], add_special_tokens=False)["input_ids"]
        out.append(list(ids[:length]))
    return out


def label(
    model: Model, ids: list[int], layers: list[int] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Predictor inputs and label ratios of the given layers (default: all) of one window."""
    from tokensift.runtime.cache import TokenCache
    from tokensift.runtime.generate import forward

    chosen = list(range(model.num_layers)) if layers is None else layers
    capture = LabelCapture(layers=frozenset(chosen))
    with torch.inference_mode():
        forward(model, torch.tensor([ids], device=model.device), TokenCache(model, capture))
    return [capture.keys[i] for i in chosen], [capture.ratios[i] for i in chosen]


def best_threshold(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict[str, float]]:
    """The logit threshold with the best F1 of (logit > threshold) against the boundary labels, over
    the given gaps (1-D, masked already): a cut between two consecutive sorted logits."""
    order = logits.argsort(descending=True)
    ranked, truth = logits[order], targets[order].double()
    tp = truth.cumsum(0)  # predicting the top i + 1 gaps as boundaries
    predicted = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
    f1 = 2 * tp / (predicted + truth.sum())
    # Only cuts between distinct logits are thresholds (ties fall on one side together).
    f1[:-1][ranked[:-1] == ranked[1:]] = -1.0
    i = int(f1.argmax())
    cut = float(ranked[i] + ranked[i + 1]) / 2 if i + 1 < len(ranked) else float(ranked[i]) - 1e-3
    precision, recall = float(tp[i] / predicted[i]), float(tp[i] / truth.sum().clamp(min=1))
    return cut, {"f1": round(float(f1[i]), 4), "precision": round(precision, 4), "recall": round(recall, 4)}


def calibrate_threshold(
    predictor: BoundaryPredictor,
    data: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    *,
    block_size: int = 64,
    chunk_beta: int = 8,
    nms_window: int = 8,
) -> dict[str, Any]:
    """The boundary threshold DHSA applies at inference, picked on held-out windows: the F1-best
    threshold on layer 0 (the layer the method reads), with the chunks it then gives (after NMS and
    the chunk cap, as `select_boundaries` runs at inference) next to those of no threshold."""
    from tokensift.methods.dhsa import select_boundaries

    logits, targets, per_window = [], [], []
    with torch.no_grad():
        for feats, ratios in data:
            logit = predictor(feats[0].float()[None])[0]
            target, mask = targets_and_mask(ratios[0], predictor.window)
            keep = mask.bool()
            logits.append(logit[keep])
            targets.append(target[keep])
            per_window.append(logit)
    cut, scores = best_threshold(torch.cat(logits), torch.cat(targets))

    def mean_chunk(threshold: float | None) -> float:
        lengths = []
        for logit in per_window:
            n = logit.shape[0]
            bounds = select_boundaries(
                logit,
                n // block_size * chunk_beta,
                window=predictor.window,
                threshold=threshold,
                nms_window=nms_window,
                tail=0,
            )
            lengths.append(n / (len(bounds) - 1))
        return round(sum(lengths) / len(lengths), 2)

    positives = torch.cat(targets)
    return {
        "logit": round(cut, 4),
        "rule": "best F1 of logit > threshold against the labels, layer 0 of the held-out windows",
        **scores,
        "positive_rate": round(float(positives.mean()), 4),
        "predicted_rate": round(float((torch.cat(logits) > cut).double().mean()), 4),
        "mean_chunk_tokens": mean_chunk(cut),
        "mean_chunk_tokens_without_threshold": mean_chunk(None),
        "windows": len(data),
    }


def evaluate(
    predictor: BoundaryPredictor,
    data: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    layers: list[int] | None = None,
) -> dict[str, float]:
    """Validation precision, recall and F1 (probability >= 0.5) and top-k overlap, as the reference,
    over the given layers of every window (default: all)."""
    tp = fp = fn = gaps = 0
    overlaps = []
    with torch.no_grad():
        for feats, all_ratios in data:
            chosen = range(len(feats)) if layers is None else layers
            for f, r in ((feats[i], all_ratios[i]) for i in chosen):
                logits = predictor(f.float()[None])[0]
                target, mask = targets_and_mask(r)
                keep = mask.bool()
                gaps += int(keep.sum())
                pred = (torch.sigmoid(logits) >= 0.5) & keep
                truth = target.bool() & keep
                tp += int((pred & truth).sum())
                fp += int((pred & ~truth).sum())
                fn += int((~pred & truth).sum())
                k = max(1, int(keep.sum()) // 16)
                top_true = set(r[keep].topk(k).indices.tolist())
                top_pred = set(logits[keep].topk(k).indices.tolist())
                overlaps.append(len(top_true & top_pred) / k)
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / max(1e-8, precision + recall), 4),
        "topk_overlap": round(sum(overlaps) / max(1, len(overlaps)), 4),
        "positive_rate": round((tp + fn) / max(1, gaps), 4),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=int, default=2048, help="tokens per training window")
    parser.add_argument("--windows", type=int, default=20, help="training windows")
    parser.add_argument("--val-windows", type=int, default=5, help="validation windows (held-out novel)")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the windows (paper: 2 over ~60K)")
    parser.add_argument("--crop", type=int, default=512, help="tokens of a window per layer in a step")
    parser.add_argument("--layers-per-step", type=int, default=6, help="layers whose gradients a step sums")
    parser.add_argument("--lr", type=float, default=LR, help="Adam learning rate (paper: 1e-4)")
    parser.add_argument("--hidden", type=int, default=256, help="predictor MLP width (paper: 256)")
    parser.add_argument("--heads", type=int, default=4, help="predictor attention heads (training script: 4)")
    parser.add_argument(
        "--reuse-predictor",
        type=Path,
        default=None,
        help="keep this artefact's trained predictor and only calibrate its boundary threshold on the "
        "held-out windows (--length, --val-windows)",
    )


def run(model: Model, args: argparse.Namespace) -> dict[str, Any]:
    from tokensift.bench.corpora import austen_books

    positive(args, "length", "windows", "val_windows", "epochs", "crop", "layers_per_step", "hidden", "heads")
    if args.length > model.context_length > 0:
        raise TokensiftError(
            f"--length {args.length} exceeds {model.name}'s context of {model.context_length}"
        )
    if not 0 < args.lr < float("inf"):
        raise TokensiftError(f"--lr must be a positive finite number, got {args.lr}")
    channels = model.num_kv_heads * model.head_dim
    if channels % args.heads:
        raise TokensiftError(f"--heads {args.heads} must divide the key width {channels}")
    torch.manual_seed(SEED)
    books = sorted(austen_books())
    held_out = books[-1]
    if args.reuse_predictor is not None:
        return recalibrate(model, args, held_out)
    t0 = time.perf_counter()
    train_ids = windows(model, args.length, args.windows, books[:-1], SEED)
    val_ids = windows(model, args.length, args.val_windows, [held_out], SEED + 1)
    train = [label(model, ids) for ids in train_ids]
    val = [label(model, ids) for ids in val_ids]
    label_seconds = time.perf_counter() - t0
    positives = sum(int(targets_and_mask(r)[0].sum()) for _, rs in train for r in rs)
    print(
        f"dhsa: labelled {len(train)} + {len(val)} windows in {label_seconds:.0f} s ({positives} positives)"
    )

    predictor = BoundaryPredictor(channels, WINDOW, args.hidden, args.heads)
    optimiser = torch.optim.Adam(predictor.parameters(), lr=args.lr)
    rng = random.Random(SEED)
    per_step = min(args.layers_per_step, model.num_layers)
    history = []
    t1 = time.perf_counter()
    for epoch in range(args.epochs):
        order = list(range(len(train)))
        random.Random(SEED + epoch).shuffle(order)
        losses = []
        predictor.train()
        for i in order:
            optimiser.zero_grad()
            feats, ratios = train[i]
            total = 0.0
            layers = [0, *rng.sample(range(1, len(feats)), per_step - 1)]
            for layer in layers:
                target, mask = targets_and_mask(ratios[layer])
                lo = rng.randrange(max(1, len(target) - args.crop + 1))
                hi = lo + args.crop
                logits = predictor(feats[layer][lo:hi].float()[None])[0]
                loss = focal_bce(logits, target[lo:hi], mask[lo:hi])
                loss.backward()  # the layers' gradients add up into one step
                total += float(loss.detach())
            optimiser.step()
            losses.append(total / len(layers))
        predictor.eval()
        metrics = evaluate(predictor, val, list(range(0, model.num_layers, 5)))
        history.append({"epoch": epoch, "train_loss": round(sum(losses) / len(losses), 5), **metrics})
        print(f"dhsa: epoch {epoch}: {history[-1]}")
    train_seconds = time.perf_counter() - t1
    final = evaluate(predictor, val)
    print(f"dhsa: validation over all layers: {final}")
    threshold = calibrate_threshold(predictor, val)
    print(f"dhsa: threshold {threshold}")
    return {
        "predictor": {"channels": channels, "window": WINDOW, "hidden": args.hidden, "heads": args.heads},
        "weights": predictor.state(),
        "recipe": {
            "labels": "attention-mass ratio across each gap, head-averaged, positive when >= 2",
            "loss": f"focal BCE gamma {GAMMA}, pos_weight {POS_WEIGHT}",
            "optimiser": f"Adam lr {args.lr}, one step per window summing {per_step} layers' "
            f"{args.crop}-token slices, {args.epochs} epochs, seed {SEED}",
            "data": f"{args.windows} windows of {args.length} tokens from {', '.join(books[:-1])}; "
            f"validation {args.val_windows} windows of {held_out}",
        },
        "history": history,
        # All layers of the held-out windows; a predictor ranking gaps at random would reach a
        # top-k overlap of about 1/16 (k is 1/16 of the gaps).
        "validation": final,
        "threshold": threshold,
        "label_seconds": round(label_seconds, 1),
        "train_seconds": round(train_seconds, 1),
    }


def recalibrate(model: Model, args: argparse.Namespace, held_out: str) -> dict[str, Any]:
    """A shipped or earlier predictor with its threshold calibrated anew (no training): labels layer 0
    of the held-out windows only, so it takes a fraction of a full calibration."""
    from tokensift.calibration import load_artefact

    document = load_artefact("dhsa", model, args.reuse_predictor)
    predictor = BoundaryPredictor.from_state(document["predictor"], document["weights"])
    t0 = time.perf_counter()
    val_ids = windows(model, args.length, args.val_windows, [held_out], SEED + 1)
    val = [label(model, ids, [0]) for ids in val_ids]
    threshold = {**calibrate_threshold(predictor, val), "seconds": round(time.perf_counter() - t0, 1)}
    print(f"dhsa: threshold {threshold}")
    kept = ("predictor", "weights", "recipe", "history", "validation", "label_seconds", "train_seconds")
    return {
        **{k: document[k] for k in kept if k in document},
        "threshold": threshold,
        "predictor_from": document.get("command", str(args.reuse_predictor)),
        "threshold_data": f"{args.val_windows} windows of {args.length} tokens of {held_out}",
    }


CALIBRATOR = Calibrator(
    name="dhsa",
    help="train DHSA's boundary predictor on the shipped text (paper recipe, see docs)",
    add_arguments=add_arguments,
    run=run,
    keys=("predictor", "weights"),
)
