"""`tokensift serve --ray`: two Ray Serve replicas of the server app on loopback, each with its own
model and KV pool, both answering the openai client."""

from __future__ import annotations

import logging
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import tiny_smol_model

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
with warnings.catch_warnings():  # Ray Serve's own pydantic deprecation warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray import serve

    from tokensift.serve.ray_serve import deploy
from tokensift.serve.config import ServeConfig  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny-smol")
    tiny = tiny_smol_model()
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    config = ServeConfig(
        model=str(path), served_model_name="tiny-smol", port=_free_port(), max_running=2, max_queue=4
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield deploy(config, replicas=2)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_the_openai_client(replicas: str) -> None:
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny-smol"]

    def ask(i: int) -> tuple[str, str]:
        chat = client.chat.completions.create(
            model="tiny-smol",
            messages=[{"role": "user", "content": "Count to three"}],
            max_tokens=4,
            temperature=0,
        )
        assert chat.usage.completion_tokens == 4
        return chat.model_extra["tokensift"]["replica"], chat.choices[0].message.content

    seen: dict[str, list[str]] = {}
    with ThreadPoolExecutor(4) as pool:  # bounded: 4 in flight, 8 per round, at most 5 rounds
        for _ in range(5):
            for replica, text in pool.map(ask, range(8)):
                seen.setdefault(replica, []).append(text)
            if len(seen) >= 2:
                break
    assert len(seen) == 2, f"only {sorted(seen)} answered"
    # Each replica loaded the same weights: greedy answers to one prompt agree across replicas.
    assert len({text for texts in seen.values() for text in texts}) == 1


def test_limits_hold_per_replica(replicas: str) -> None:
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-smol", prompt="Hi", max_tokens=10**6)
