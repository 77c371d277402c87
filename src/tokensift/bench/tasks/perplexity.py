"""Perplexity of long public-domain prose, scored chunk by chunk through the method's own cache."""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Any

import torch

from tokensift.bench.corpora import austen_books
from tokensift.bench.tasks.base import Sample, Task, TokenCounter
from tokensift.errors import TokensiftError

if TYPE_CHECKING:
    from tokensift.models import Model
    from tokensift.runtime.plan import Plan


class Perplexity(Task):
    """PG-19-style perplexity on a window of one of Jane Austen's novels (shipped, public domain).

    The window of `length` tokens is fed in chunks (256 tokens, or bench's `--prefill-chunk`); each
    chunk attends to what the method kept of the earlier ones, so eviction methods get a real,
    different score. A fractional budget is a fraction of the whole window. Reports perplexity (exp
    of the mean NLL) and bits per byte.
    """

    name = "perplexity"
    description = "perplexity over a Jane Austen window, chunked through the method's cache"
    metric = "perplexity"
    source = "PG-19-style perplexity, substitute: Jane Austen's novels instead of PG-19"

    def __init__(self, chunk: int = 256):
        self.chunk = chunk

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        books = austen_books()
        title = rng.choice(sorted(books))
        text = books[title]
        span = length * 8  # characters: always more than `length` tokens of English prose
        paragraphs = [i for i in range(len(text) - span) if text.startswith("\n\n", i)]
        start = rng.choice(paragraphs) + 2 if paragraphs else 0
        window = text[start : start + span]
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=window,
            answer=None,
            max_new_tokens=0,
            meta={"book": title, "offset": start},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        raise NotImplementedError("perplexity is computed in evaluate()")

    generative = False  # scores a text window chunk by chunk; no prompt/question protocol

    def evaluate(
        self,
        model: Model,
        plan: Plan,
        sample: Sample,
        *args: Any,
        prefill_chunk: int | None = None,
        prefill_lookahead: int = 0,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`prefill_chunk` (bench's `--prefill-chunk`) sets the chunk size instead of the task's own."""
        from tokensift.runtime.cache import TokenCache
        from tokensift.runtime.generate import collect_stats, forward, synchronize

        if prefill_lookahead:
            raise TokensiftError(
                "perplexity scores every token of its window: a lookahead would choose what each chunk "
                "keeps from text not yet read; drop --prefill-lookahead for the perplexity task"
            )
        chunk = prefill_chunk or self.chunk
        assert model.tokenizer is not None
        ids = model.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"][: sample.length]
        text_bytes = len(model.tokenizer.decode(ids).encode())
        tokens = torch.tensor([ids], device=model.device)
        nll = torch.zeros((), dtype=torch.float64, device=model.device)
        previous: torch.Tensor | None = None
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache = TokenCache(model, plan, prompt_tokens=len(ids))
            for s in range(0, len(ids), chunk):
                x = tokens[:, s : s + chunk]
                cache.count("prefill_chunks")
                logits = forward(model, x, cache, last_only=False)[0].float()
                if previous is not None:
                    logits = torch.cat([previous, logits])
                    targets = x[0]
                else:
                    targets = x[0, 1:]
                nll += torch.nn.functional.cross_entropy(
                    logits[: len(targets)], targets, reduction="sum"
                ).double()
                previous = logits[-1:]
        synchronize(nll)
        seconds = time.perf_counter() - t0
        scored = len(ids) - 1
        mean = float(nll) / scored
        stats = collect_stats(model, plan, cache, len(ids), 0, seconds, 0.0, "end")
        stats.prefill_chunk = prefill_chunk or 0  # the row's key: 0 when the task's own chunk was used
        return {
            "prediction": "",
            "score": math.exp(mean),
            "nll": mean,
            "bits_per_byte": float(nll) / (math.log(2) * text_bytes),
            "scored_tokens": scored,
            **stats.to_dict(),
        }
