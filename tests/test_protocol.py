"""The query-agnostic protocol: compress the context alone, append the question uncompressed."""

from __future__ import annotations

import pytest
import torch

import tokensift
from tokensift.runtime.generate import encode, encode_split, join_question

from .conftest import prompt_ids, tiny_model


def test_split_concatenates_to_the_joined_prompt() -> None:
    tok = tokensift.models.load_tokenizer("smollm2-135m")
    model = tokensift.Model("smollm2", None, tok, source="tokenizer only")
    context, question = "Some text. The pass key is 31415.\nMore text here.", "What is the pass key?"
    for prefix in ("", " The pass key is"):
        ctx_ids, q_ids = encode_split(model, context, question, answer_prefix=prefix)
        assert ctx_ids + q_ids == encode(model, join_question(context, question), answer_prefix=prefix)
        assert tok.decode(q_ids).startswith(question)
        assert question not in tok.decode(ctx_ids)


def test_question_is_appended_without_eviction() -> None:
    model = tiny_model("llama", layers=2)
    context, question = prompt_ids(60), prompt_ids(12, seed=5)
    cache = tokensift.TokenCache(model.model, "snapkv:budget=20,window_size=8", prompt_tokens=len(context))
    with torch.inference_mode():
        model.model(torch.tensor([context]), cache=cache, use_cache=True)
        assert cache.tokens_held == [20, 20]
        cache.evicting = False
        start = cache.next_position
        model.model(
            torch.tensor([question]),
            cache=cache,
            use_cache=True,
            position_ids=torch.arange(start, start + 12)[None],
        )
    assert cache.tokens_held == [32, 32]  # the 12 question tokens all stay
    assert cache.layers[0].positions[0, 0, -12:].tolist() == list(range(60, 72))


@pytest.mark.slow
def test_dense_is_the_same_under_both_protocols() -> None:
    smol = tokensift.load("smollm2-135m")
    context = "The secret word is 'lantern'. " + "The sky is blue. " * 20
    joined = tokensift.generate(smol, join_question(context, "What is the secret word?"), max_new_tokens=6)
    split = tokensift.generate(smol, context, question="What is the secret word?", max_new_tokens=6)
    assert joined.token_ids == split.token_ids
    assert split.stats.counters["question_tokens"] > 5
