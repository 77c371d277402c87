"""The OpenAI-compatible FastAPI app: `create_app(config)` is all a host (uvicorn, Ray Serve) needs.

The app loads its model in its lifespan (or on first use when a host skips the lifespan), so every
process or replica holds its own. Bodies are read and validated here (size cap, strict pydantic
models) so that every bad request is a 4xx with a one-line reason, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from tokensift.errors import NoOpWarning, TokensiftError, one_line
from tokensift.models import Model, load
from tokensift.runtime import memory
from tokensift.runtime.generate import Generation, check_context, encode_split
from tokensift.serve.config import ServeConfig
from tokensift.serve.engine import (
    Batchers,
    Job,
    KVPool,
    finish_reason,
    jsonable,
    make_eos_guard,
    parse_plan,
    reservation_bytes,
    run_job,
    stop_reason_field,
)
from tokensift.serve.guards import RepetitionGuard
from tokensift.serve.metrics import ServeMetrics
from tokensift.serve.schema import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    check_chat,
    check_completion,
    stop_list,
    validation_reason,
)


class ServerState:
    """Everything one app instance owns: its model, pool, workers and metrics."""

    def __init__(self, config: ServeConfig, model: Model | None):
        self.config = config
        self.model = model
        self.replica = config.replica
        self.metrics = ServeMetrics(config.model_name)
        self.metrics.kv_capacity.set(config.kv_pool_bytes)
        self.pool = KVPool(config.kv_pool_bytes, config.max_queue, config.max_running, self._pool_changed)
        self.executor = ThreadPoolExecutor(config.max_running, thread_name_prefix="tokensift-serve")
        self.default_plan = parse_plan(config.method, None)
        self.batchers = Batchers(config.max_batch)
        self._load_lock = threading.Lock()
        self.recent_e2e: list[float] = []
        self.started = time.time()
        settings = config.malloc_settings
        self.allocator = memory.tune_malloc(settings)
        self.trim_after_request = memory.TRIM in settings

    def _pool_changed(self) -> None:
        m, pool = self.metrics, self.pool
        m.running.set(pool.running)
        m.waiting.set(pool.waiting)
        m.kv_reserved.set(pool.reserved)
        m.kv_usage.set(pool.reserved / pool.capacity)

    def load_model(self) -> Model:
        with self._load_lock:
            if self.model is None:
                self.model = load(self.config.model, dtype=self.config.dtype, device=self.config.device)
        return self.model

    async def ensure_model(self) -> Model:
        if self.model is not None:
            return self.model
        return await asyncio.get_running_loop().run_in_executor(None, self.load_model)

    def retry_after(self) -> int:
        recent = self.recent_e2e[-16:]
        return max(1, math.ceil(sum(recent) / len(recent))) if recent else 1


def error_response(exc: BadRequest) -> JSONResponse:
    kind = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
    body = {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.status}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadRequest(f"request body of {length} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"request body exceeds the limit of {limit} bytes")
    try:
        data = json.loads(bytes(body), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise BadRequest(f"body is not valid JSON: {one_line(str(exc))}") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def create_app(config: ServeConfig, model: Model | None = None) -> FastAPI:
    """The server for one model replica. `model` injects an already loaded model (tests)."""
    state = ServerState(config, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warnings.filterwarnings("ignore", category=NoOpWarning)  # notes are echoed in each response
        await state.ensure_model()
        yield
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tokensift", lifespan=lifespan)
    app.state.tokensift = state

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        state.metrics.reject(exc.status, "busy" if exc.status == 429 else "invalid")
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: answered in the OpenAI error shape, counted, and the worker lives on.
        state.metrics.reject(500, type(exc).__name__)
        body = {
            "error": {
                "message": one_line(f"{type(exc).__name__}: {exc}"),
                "type": "server_error",
                "param": None,
                "code": 500,
            }
        }
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        pool = state.pool
        return {
            "status": "ok" if state.model is not None else "loading",
            "replica": state.replica,
            "model": config.model_name,
            "running": pool.running,
            "waiting": pool.waiting,
            "kv_pool": {
                "capacity_bytes": pool.capacity,
                "reserved_bytes": pool.reserved,
                "held_bytes": pool.held_bytes,
            },
            "allocator": state.allocator,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        m = state.model
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "tokensift",
                    "max_model_len": m.context_length if m is not None else None,
                    "tokensift": {"default_method": state.default_plan.spec, "replica": state.replica},
                }
            ],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.kv_held.set(state.pool.held_bytes)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    async def handle(request: Request, chat: bool) -> Response:
        arrival = time.monotonic()
        data = await read_json(request, config.max_body_bytes)
        try:
            req: ChatRequest | CompletionRequest = (
                ChatRequest if chat else CompletionRequest
            ).model_validate(data)
        except ValidationError as exc:
            message, param = validation_reason(exc)
            raise BadRequest(message, param=param) from None
        if isinstance(req, ChatRequest):
            check_chat(req, config.max_stop_sequences, config.max_logprobs)
        else:
            check_completion(req, config.max_stop_sequences, config.max_logprobs)
        if req.model is not None and req.model not in (config.model_name, config.model):
            raise BadRequest(
                f"model {req.model!r} is not served here: this server runs {config.model_name!r}",
                status=404,
                param="model",
            )
        model = await state.ensure_model()
        job = build_job(req, model, arrival)
        state.pool.check_fits_ever(job.reserved, f"this request ({job_tokens(job)})")
        state.metrics.by_method.labels(config.model_name, family(job)).inc()
        timeout = max(0.0, job.deadline - time.monotonic())
        await state.pool.acquire(job.reserved, timeout, state.retry_after())
        job.admitted_at = time.monotonic()
        state.metrics.queue_time.observe(job.admitted_at - arrival)
        loop = asyncio.get_running_loop()
        if req.stream:
            events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            job.emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        future = start(job, model)
        name = "chatcmpl" if chat else "cmpl"
        rid, created = f"{name}-{job.id}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream(job, future, events, chat, rid, created, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        gen = await wait_or_cancel(request, job, future)
        if gen is None:
            return Response(status_code=499)
        return JSONResponse(body(job, gen, chat, rid, created))

    def build_job(req: ChatRequest | CompletionRequest, model: Model, arrival: float) -> Job:
        ext = req.tokensift
        spec = ext.method if ext is not None and ext.method is not None else None
        plan = state.default_plan if spec is None else parse_plan(spec, config.allow_methods)
        question = ext.question if ext is not None else None
        if question is not None and not question.strip():
            raise BadRequest("tokensift.question is empty", param="tokensift.question")
        prompt, answer_prefix, raw = prompt_of(req, model, question)
        try:
            ids, question_ids = encode_split(model, prompt, question, raw=raw, answer_prefix=answer_prefix)
        except TokensiftError as exc:
            raise BadRequest(one_line(str(exc)), param="prompt") from None
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"prompt could not be tokenized: {one_line(str(exc))}", param="prompt") from None
        if not ids:
            raise BadRequest("empty prompt", param="prompt")
        vocab = int(model.model.config.vocab_size)
        if isinstance(prompt, list) and any(not 0 <= t < vocab for t in prompt):
            raise BadRequest(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        n_prompt = len(ids) + len(question_ids)
        room = model.context_length - n_prompt if model.context_length else config.max_new_tokens_cap
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > config.max_new_tokens_cap:
            raise BadRequest(
                f"max_tokens={asked} exceeds this server's cap of {config.max_new_tokens_cap}",
                param="max_tokens",
            )
        max_tokens = asked if asked is not None else min(config.default_max_tokens, room)
        if max_tokens < 1:
            raise BadRequest(
                f"the prompt's {n_prompt} tokens fill {model.name}'s context of "
                f"{model.context_length} tokens",
                param="prompt",
            )
        try:
            check_context(model, n_prompt, max_tokens)
        except TokensiftError as exc:
            raise BadRequest(one_line(str(exc)), param="max_tokens") from None
        try:
            reserved = reservation_bytes(model, plan, len(ids), len(question_ids), max_tokens)
        except TokensiftError as exc:
            raise BadRequest(f"tokensift.method: {one_line(str(exc))}", param="tokensift.method") from None
        rd = req.repetition_detection
        repetition = RepetitionGuard(
            rd.min_pattern_size if rd else config.repetition_min_pattern_size,
            rd.max_pattern_size if rd else config.repetition_max_pattern_size,
            rd.min_count if rd else config.repetition_min_count,
        )
        return Job(
            prompt=prompt,
            plan=plan,
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed if req.seed is not None else 0,
            stops=stop_list(req.stop),
            repetition=repetition,
            eos_guard=make_eos_guard(model, config),
            deadline=arrival + config.request_timeout,
            arrival=arrival,
            reserved=reserved,
            question=question,
            answer_prefix=answer_prefix,
            raw=raw,
        )

    def start(job: Job, model: Model) -> asyncio.Future[Generation]:
        loop = asyncio.get_running_loop()
        job.batcher, job.unbatched = state.batchers.acquire(job.plan, model)

        def work() -> Generation:
            try:
                return run_job(model, job, state.pool.held, state.metrics.itl.observe)
            finally:  # the request's tensors are gone: hand their pages back (see runtime.memory)
                if state.trim_after_request:
                    memory.trim()

        future = loop.run_in_executor(state.executor, work)

        def finished(f: asyncio.Future[Generation]) -> None:
            state.pool.release(job.reserved)
            if job.batcher is not None:
                state.batchers.release(job.plan)
            e2e = time.monotonic() - job.arrival
            state.recent_e2e = [*state.recent_e2e[-31:], e2e]
            if f.cancelled() or f.exception() is not None:
                state.metrics.success.labels(config.model_name, "error").inc()
                return
            gen = f.result()
            m, stats = state.metrics, gen.stats
            m.e2e.observe(e2e)
            if job.first_token_at is not None:
                m.ttft.observe(job.first_token_at - job.arrival)
            m.prefill_time.observe(stats.prefill_seconds)
            m.decode_time.observe(stats.decode_seconds)
            m.prompt_tokens.inc(stats.prompt_tokens)
            m.generation_tokens.inc(stats.new_tokens)
            m.success.labels(config.model_name, finish_reason(job.stop)).inc()
            if job.stop in ("timeout", "repetition_detected", "eos_suppressed", "cancelled"):
                m.guard.labels(config.model_name, job.stop).inc()
            if stats.kv_bytes_peak > job.reserved:
                m.reservation_exceeded.inc()

        future.add_done_callback(finished)
        return future

    async def wait_or_cancel(
        request: Request, job: Job, future: asyncio.Future[Generation]
    ) -> Generation | None:
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    return result_or_400(future)
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    async def stream(
        job: Job,
        future: asyncio.Future[Generation],
        events: asyncio.Queue[tuple[str, Any]],
        chat: bool,
        rid: str,
        created: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        def chunk(delta: str | None, finish: str | None = None, **extra: Any) -> str:
            if chat:
                d: dict[str, Any] = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            if finish is not None:
                choice["stop_reason"] = stop_reason_field(job.stop)
            payload = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": config.model_name,
                "choices": [choice],
                **extra,
            }
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:
                first = json.loads(chunk("")[6:])
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    kind, value = getter.result()
                    if kind == "delta":
                        yield chunk(value)
                    continue
                getter.cancel()
                while not events.empty():  # deltas queued before the thread ended
                    kind, value = events.get_nowait()
                    if kind == "delta":
                        yield chunk(value)
                break
            try:
                gen = result_or_400(future)
            except BadRequest as exc:
                err = {"error": {"message": str(exc), "type": "invalid_request_error", "code": exc.status}}
                yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
                return
            ext = {"tokensift": tokensift_block(job, gen)}
            yield chunk(None if chat else "", finish_reason(job.stop), **ext)
            if include_usage:
                payload = {
                    "id": rid,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": config.model_name,
                    "choices": [],
                    "usage": usage(gen),
                }
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():
                job.cancelled.set()  # client went away mid-stream: the worker stops at its next token

    def result_or_400(future: asyncio.Future[Generation]) -> Generation:
        exc = future.exception()
        if isinstance(exc, TokensiftError):
            raise BadRequest(one_line(str(exc)))
        if exc is not None:
            raise exc
        return future.result()

    def tokensift_block(job: Job, gen: Generation) -> dict[str, Any]:
        stats = gen.stats.to_dict()
        block = {
            "method": gen.stats.method,
            "params": stats.pop("params"),
            "replica": state.replica,
            "stop": job.stop,
            "kv_reserved_bytes": job.reserved,
            "queue_seconds": (job.admitted_at or job.arrival) - job.arrival,
            "batched": job.batcher is not None,
            "batch_size_max": job.batch_size_max if job.batcher else int(gen.stats.new_tokens > 1),
            "batched_steps": job.batched_steps,
            "unbatched_reason": job.unbatched,
            "stats": stats,
        }
        if job.eos_guard is not None:
            block["eos_guard"] = job.eos_guard.summary()
        return jsonable(block)

    def usage(gen: Generation) -> dict[str, int]:
        p, c = gen.stats.prompt_tokens, gen.stats.new_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def body(job: Job, gen: Generation, chat: bool, rid: str, created: int) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None,
            "finish_reason": finish_reason(job.stop),
            "stop_reason": stop_reason_field(job.stop),
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": gen.text}
        else:
            choice["text"] = gen.text
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": config.model_name,
            "choices": [choice],
            "usage": usage(gen),
            "tokensift": tokensift_block(job, gen),
        }

    return app


def prompt_of(
    req: ChatRequest | CompletionRequest, model: Model, question: str | None
) -> tuple[str | list[int], str, bool]:
    """(prompt, answer prefix, raw) for generate: completions are raw text or ids; a chat is rendered
    with the model's template. With a question, a chat's rendered text is split so the question and
    everything after it are appended uncompressed (generate's query-agnostic protocol)."""
    if isinstance(req, CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise BadRequest(f"{len(prompt)} prompts in one request: send one", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and question is not None:
            raise BadRequest("tokensift.question needs a text prompt", param="tokensift.question")
        return prompt, "", True
    tok = model.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise BadRequest(f"model {model.name!r} has no chat template: use /v1/completions", param="messages")
    messages = [
        {"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages
    ]
    if question is not None:
        last = messages[-1]
        if last["role"] != "user":
            raise BadRequest("tokensift.question needs a user message last", param="tokensift.question")
        sep = "" if last["content"][-1:].isspace() else "\n\n"
        last["content"] = last["content"] + sep + question
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
        raise BadRequest(
            f"chat template refused the messages: {one_line(str(exc))}", param="messages"
        ) from None
    if question is None:
        try:
            return list(tok(text, add_special_tokens=False)["input_ids"]), "", True
        except (ValueError, TypeError) as exc:
            raise BadRequest(
                f"messages could not be tokenized: {one_line(str(exc))}", param="messages"
            ) from None
    at = text.rindex(question)
    return text[:at], text[at + len(question) :], True


def family(job: Job) -> str:
    return "+".join(m.name for m in job.plan.methods) or "dense"


def job_tokens(job: Job) -> str:
    return f"max_tokens {job.max_tokens} with method {job.plan.spec}"
