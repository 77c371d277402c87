"""Every registered method on tiny models in float32, bfloat16 and float16: the generation runs, its
logits are finite, and every tensor the cache and the method hold stays on the model's device, K/V
in the model's dtype (method state in the model's dtype, or float32/float64 where a method keeps
score accumulators at full precision on purpose).

The device is the CPU unless `TOKENSIFT_TEST_DEVICE` names another (`TOKENSIFT_TEST_DEVICE=cuda`:
scripts/gpu_check.sh runs this file on a GPU). The runs are test_applied.py's `applies` cases, so a
new method is covered here as soon as it has its case there.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import tokensift
from tokensift import NoOpWarning
from tokensift.methods import REGISTRY
from tokensift.runtime.generate import Decoding

from .conftest import prompt_ids, tiny_model, tiny_smol_model
from .test_applied import CASES, PROMPT, Files, Run
from .test_crag import fake_embed, passages
from .test_speculative import _fresh_state  # noqa: F401 (autouse: fresh suffix trees, one thread)

DEVICE = os.environ.get("TOKENSIFT_TEST_DEVICE", "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Float state a method may keep above the model's precision (score accumulators, statistics).
FULL_PRECISION = {torch.float32, torch.float64}

if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"TOKENSIFT_TEST_DEVICE={DEVICE} but torch sees no CUDA GPU", allow_module_level=True)


def convert(model: tokensift.Model, dtype: torch.dtype) -> tokensift.Model:
    model.model.to(device=DEVICE, dtype=dtype)
    return model


class DeviceFiles(Files):
    """The case's calibration files, computed on the converted model (its fingerprint), and a noisy
    'small' model on the same device and dtype."""

    def small(self, noise: float = 0.3) -> tokensift.Model:
        clone = copy.deepcopy(self.model.model)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in clone.parameters():
                scale = noise * p.float().std()
                p.add_((torch.randn(p.shape, generator=g) * scale.cpu()).to(p.device, p.dtype))
        return tokensift.wrap(clone, name="tiny-small")


def tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors inside a state value (nested lists, tuples, dicts and plain objects, a few levels)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 3:
        return []
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v, depth + 1)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors(v, depth + 1)]
    if hasattr(value, "__dict__") and not isinstance(value, type | torch.nn.Module):
        return [t for v in vars(value).values() for t in tensors(v, depth + 1)]
    return []


class Inspector:
    """Called after every committed token: records what the cache and the method hold."""

    def __init__(self, model: tokensift.Model):
        self.device, self.dtype = model.device, model.dtype
        self.problems: set[str] = set()
        self.kv_checked = 0
        self.logits_checked = 0

    def __call__(self, decoding: Decoding, token: int, logits: torch.Tensor | None) -> None:
        if logits is not None:
            self.logits_checked += 1
            if not bool(torch.isfinite(logits).all()):
                self.problems.add(f"non-finite logits at token {len(decoding.tokens)}")
        for layer in decoding.cache.layers:
            kv = [getattr(layer, name, None) for name in ("keys", "values")]
            for t in (t for t in kv if isinstance(t, torch.Tensor)):
                self.kv_checked += 1
                if t.dtype != self.dtype or t.device.type != self.device.type:
                    self.problems.add(f"layer {layer.index} K/V {t.dtype} on {t.device}")
            state = {**getattr(layer, "states", {}), **getattr(layer, "extra", {})}
            for name, value in state.items():
                for t in tensors(value):
                    if t.device.type != self.device.type:
                        self.problems.add(f"layer state {name!r} on {t.device}")
                    if t.is_floating_point() and t.dtype != self.dtype and t.dtype not in FULL_PRECISION:
                        self.problems.add(f"layer state {name!r} is {t.dtype}")
        for name, value in decoding.cache.shared.items():
            for t in tensors(value):
                if t.device.type != self.device.type and t.numel() > 1:
                    self.problems.add(f"shared state {name!r} on {t.device}")


def run_case(run: Run, dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if run.passages:
        monkeypatch.setattr(tokensift.embeddings, "embed", fake_embed)
        model = convert(tiny_smol_model(), dtype)
        inspector = Inspector(model)
        out = tokensift.generate(
            model,
            None,
            run.method,  # type: ignore[arg-type]
            passages=passages(run.passages),
            max_new_tokens=run.new,
            ignore_eos=True,
            return_logits=True,
            on_token=inspector,
        )
        return out, inspector
    model = convert(tiny_model("llama", layers=run.layers), dtype)
    method = run.method if isinstance(run.method, str) else run.method(DeviceFiles(tmp_path, model))
    ids = prompt_ids(PROMPT) if run.prompt is None else run.prompt
    inspector = Inspector(model)
    out = tokensift.generate(
        model,
        ids,
        method,  # type: ignore[arg-type]
        max_new_tokens=run.new,
        ignore_eos=True,
        return_logits=True,
        on_token=inspector,
    )
    return out, inspector


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_method_keeps_device_and_dtype(
    name: str, dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]  # test_applied.py fails for a method without a case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)
        out, inspector = run_case(case.applies, dtype, tmp_path, monkeypatch)
    assert out.stats.applied, (name, dtype, out.stats.notes)
    assert out.stats.new_tokens == case.applies.new
    assert inspector.kv_checked > 0 and inspector.logits_checked > 0
    assert not inspector.problems, sorted(inspector.problems)
    assert out.logits is not None and all(bool(torch.isfinite(x).all()) for x in out.logits)


def test_load_refuses_an_unusable_device() -> None:
    from tokensift.errors import TokensiftError
    from tokensift.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TokensiftError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(TokensiftError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(TokensiftError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_generate_cli_refuses_a_missing_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from tokensift.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["generate", "hello", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_block_sparse_a_shape_equals_its_mask(dtype: torch.dtype) -> None:
    """The block-sparse engine on the device (or, with TOKENSIFT_TRITON=1 on CUDA, the Triton kernel)
    computes A-shape attention exactly: dense attention under the token-level A-shape mask."""
    import torch.nn.functional as F

    from tokensift.methods.a_shape import a_shape_dense_rows, a_shape_mask
    from tokensift.runtime import block_sparse as bsa

    torch.manual_seed(0)
    b, hq, hkv, length, d, bs, sinks, local = 1, 4, 2, 200, 16, 16, 4, 40
    q, k, v = torch.randn(b, hq, length, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    device = torch.device(DEVICE)
    start = a_shape_dense_rows(length, length, sinks, local)
    firsts = bsa.block_starts(length, length, start, bs).to(device)
    past = bsa.a_shape_past(firsts, sinks, local, length)[None, None]
    groups = bsa.Groups.per_kv_head(hkv, hq // hkv, device)
    out = torch.zeros(b, hq, length, d, device=device, dtype=dtype)
    qd, kd, vd = (t.to(device, dtype) for t in (q, k, v))
    mask = bsa.a_shape_row_mask(sinks, local, bs)
    bsa.sparse_attention(
        qd,
        kd,
        vd,
        d**-0.5,
        past,
        groups,
        out,
        block_size=bs,
        start_row=start,
        row_mask=mask,
        window=(sinks, local),
    )
    # The reference sees the inputs as rounded to `dtype`, in float32.
    q32, k32, v32 = (t.to(dtype).float() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(
        q32,
        k32.repeat_interleave(hq // hkv, 1),
        v32.repeat_interleave(hq // hkv, 1),
        attn_mask=a_shape_mask(length, sinks, local),
        scale=d**-0.5,
    )
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    error = (out.float().cpu()[:, :, start:] - ref[:, :, start:]).abs().max().item()
    assert out.dtype == dtype and out.device.type == device.type
    assert error < tolerance, error
