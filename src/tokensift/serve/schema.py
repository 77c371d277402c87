"""OpenAI request bodies as strict pydantic v2 models, plus the `tokensift` and vLLM extensions.

Strict: a field of the wrong type is refused rather than coerced, and an unknown field is refused
(a typo such as `max_token` would otherwise be ignored silently). Requests for things the server
does not do (n > 1, best_of, logprobs beyond the cap, tools, penalties) are refused by `check_*`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

StrictModel = ConfigDict(extra="forbid", strict=True)
MAX_STOP_CHARS = 256
NonNegFloat = Annotated[float, Field(ge=0)]


class RepetitionDetection(BaseModel):
    """vLLM's `repetition_detection`: stop when the last `min_count` blocks of some size in
    [min_pattern_size, max_pattern_size] tokens are identical."""

    model_config = StrictModel
    min_pattern_size: Annotated[int, Field(ge=1, le=1024)] = 1
    max_pattern_size: Annotated[int, Field(ge=1, le=1024)] = 64
    min_count: Annotated[int, Field(ge=2, le=1024)] = 4


class TokensiftExtension(BaseModel):
    """The per-request extension: `{"tokensift": {"method": ..., "question": ...}}`."""

    model_config = StrictModel
    method: str | None = None
    question: str | None = None


class StreamOptions(BaseModel):
    model_config = StrictModel
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Common(BaseModel):
    model_config = StrictModel
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    repetition_detection: RepetitionDetection | None = None
    tokensift: TokensiftExtension | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: Annotated[int, Field(ge=1)] | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0)] | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = StrictModel
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = StrictModel
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = StrictModel
    type: Literal["text"]


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class BadRequest(Exception):
    """A client error: status and a one-line reason, answered as an OpenAI error object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, **headers: str):
        super().__init__(message)
        self.status = status
        self.param = param
        self.headers = headers


def validation_reason(exc: ValidationError) -> tuple[str, str | None]:
    """The first validation error as one line: `field.path: message`."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    path = ".".join(str(p) for p in err["loc"])
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    elif err["type"] == "missing":
        message = "field required"
    elif len(errors) > 1 and err["loc"] and all(e["loc"][:1] == err["loc"][:1] for e in errors):
        # A union field (prompt, stop, content): one line for the field, not one per alternative.
        path = str(err["loc"][0])
        return f"{path}: no accepted type matches a {type(err['input']).__name__} value", path
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {message}{more}" if path else f"{message}{more}", path or None


def check_common(req: _Common, max_stop: int) -> None:
    if req.n not in (None, 1):
        raise BadRequest(f"n={req.n} is not supported: one choice per request", param="n")
    both = req.max_tokens is not None and req.max_completion_tokens is not None
    if both and req.max_tokens != req.max_completion_tokens:
        raise BadRequest("max_tokens and max_completion_tokens disagree: send one", param="max_tokens")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise BadRequest(f"{name} is not supported (send 0 or omit it)", param=name)
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported", param="logit_bias")
    stops = stop_list(req.stop)
    if len(stops) > max_stop:
        raise BadRequest(f"{len(stops)} stop sequences: at most {max_stop}", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    rd = req.repetition_detection
    if rd is not None and rd.min_pattern_size > rd.max_pattern_size:
        raise BadRequest(
            "repetition_detection.min_pattern_size exceeds max_pattern_size", param="repetition_detection"
        )


def check_completion(req: CompletionRequest, max_stop: int, max_logprobs: int) -> None:
    check_common(req, max_stop)
    if req.best_of not in (None, 1):
        raise BadRequest(
            f"best_of={req.best_of} is not supported: one candidate per request", param="best_of"
        )
    if req.logprobs is not None and req.logprobs > max_logprobs:
        raise BadRequest(
            f"logprobs={req.logprobs} exceeds this server's cap of {max_logprobs}", param="logprobs"
        )
    if req.echo:
        raise BadRequest("echo is not supported", param="echo")
    if req.suffix:
        raise BadRequest("suffix (insertion) is not supported", param="suffix")


def check_chat(req: ChatRequest, max_stop: int, max_logprobs: int) -> None:
    check_common(req, max_stop)
    if (req.logprobs or req.top_logprobs) and max(int(req.logprobs), req.top_logprobs or 0) > max_logprobs:
        raise BadRequest(f"logprobs exceed this server's cap of {max_logprobs}", param="logprobs")
    if req.tools:
        raise BadRequest("tools are not supported", param="tools")
    if req.messages[-1].role == "assistant":
        raise BadRequest("the last message must not be the assistant's", param="messages")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
