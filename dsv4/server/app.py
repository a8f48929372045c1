"""The OpenAI-compatible HTTP API over the engine's public API (`submit`, `stats`, events).

Chat requests are rendered with the official V4 encoder (`dsv4.chat.encode_messages`), generated with
EOS as stop token, and the completion text is parsed back (`StreamingParser`) into `reasoning_content`,
`content` and OpenAI `tool_calls` — while streaming too, so DSML markup never reaches `content`.
The engine runs on its own thread and calls back on every token; callbacks hop onto the event loop
(`call_soon_threadsafe`), so HTTP streaming and decoding run concurrently. A client that disconnects
cancels its request, which frees its batch slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import EOS, ChatFormatError, StreamingParser, encode_messages
from ..chat.tokens import BOS, INVOKE_OPEN, TOOL_CALLS_OPEN
from ..engine import Event, RequestRejected, SamplingParams
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("dsv4.server")
THINKING_DEFAULTS = ("off", "high", "max")


class _Tokens:
    """Text <-> ids for the served model. A model whose vocabulary is smaller than the tokenizer's (the
    tiny test presets) gets ids folded into range, as `dsv4 generate` does."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tok, self.vocab = tokenizer, vocab_size
        self.fold = tokenizer.vocab_size > vocab_size
        self.eos_id = tokenizer.eos_id % vocab_size

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        return [t % self.vocab for t in ids] if self.fold else ids

    def piece(self, token: int) -> str:
        return self.tok.decode([token])


def create_app(engine, tokenizer, model_name: str, api_key: str | None = None, default_thinking: str = "off",
               default_max_tokens: int = 4096) -> FastAPI:
    """engine: a started `dsv4.engine.Engine` (or anything with its public API); tokenizer: a
    `dsv4.tokenizer.Tokenizer`. The app shuts the engine down when it stops."""
    if default_thinking not in THINKING_DEFAULTS:
        raise ValueError(f"default_thinking={default_thinking!r}; use one of {THINKING_DEFAULTS}")
    tokens = _Tokens(tokenizer, engine.vocab_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="dsv4", version="1", lifespan=lifespan)
    http_errors: dict[int, int] = {}
    started = int(time.time())

    # ------------------------------------------------------------------ errors and auth
    def _error(e: APIError) -> JSONResponse:
        http_errors[e.status] = http_errors.get(e.status, 0) + 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _bad_schema(request: Request, e: RequestValidationError):
        problems = [f"{'.'.join(str(x) for x in err['loc'] if x != 'body') or 'body'}: {err['msg']}"
                    for err in e.errors()[:5]]
        param = ".".join(str(x) for x in e.errors()[0]["loc"][1:]) if e.errors() else None
        return _error(APIError(400, "invalid request: " + "; ".join(problems), "invalid_request", param or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error")
        return _error(APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error"))

    def _authorize(request: Request) -> None:
        # A dependency, not an HTTP middleware: BaseHTTPMiddleware wraps `receive` and would hide the
        # client's disconnect from the handlers.
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "invalid_api_key")

    v1 = [Depends(_authorize)]

    def _check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "model_not_found", "model")

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "dsv4", "max_model_len": engine.max_context}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(engine.stats(), http_errors), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ generation plumbing
    def _submit(ids: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = engine.submit(ids, params, on_event=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        except RequestRejected as e:
            status = 503 if e.code == "server_overloaded" else 400
            raise APIError(status, str(e), e.code, e.param) from None
        return handle, q

    async def _collect(request: Request, handle, q) -> list[Event]:
        """All events of a non-streaming request; cancels it if the client goes away meanwhile."""
        events, checked = [], time.monotonic()
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), timeout=0.25)
            except asyncio.TimeoutError:
                ev = None
            if ev is None or time.monotonic() - checked > 0.25:  # tokens may keep coming: look anyway
                checked = time.monotonic()
                if await request.is_disconnected():
                    handle.cancel()
                    raise APIError(499, "client disconnected", "client_closed")
            if ev is None:
                continue
            events.append(ev)
            if ev.finished:
                break
        if events[-1].finish_reason == "error":
            raise APIError(500, f"generation failed: {events[-1].error}", "generation_error")
        return events

    def _params(req, n_prompt: int, max_tokens: int | None, logprobs: int | None, stop_ids=()) -> SamplingParams:
        room = engine.max_context - n_prompt
        if room < 1:
            raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context is {engine.max_context}",
                           "context_length_exceeded", "messages")
        try:
            return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  max_new_tokens=max_tokens or min(default_max_tokens, room), seed=req.seed,
                                  stop=tuple(req.stop or ()), stop_token_ids=stop_ids, logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request") from None

    def _stream(gen: AsyncIterator[dict], handle) -> StreamingResponse:
        async def sse():
            try:
                async for chunk in gen:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on disconnect (the task is cancelled): free the slot
                handle.cancel()
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _usage(ev: Event) -> dict:
        u = ev.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def _chat_logprobs(events: list[Event]) -> list[dict]:
        out = []
        for ev in events:
            for lp in ev.logprobs:
                s = tokens.piece(lp.token)
                out.append({"token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (t := tokens.piece(i)), "logprob": v, "bytes": list(t.encode())}
                                             for i, v in lp.top]})
        return out

    # ------------------------------------------------------------------ /v1/chat/completions
    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(req: ChatCompletionRequest, request: Request):
        _check_model(req.model)
        mode, effort = _reasoning_mode(req, default_thinking)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        tool_names = [t.function.name for t in req.tools or []]
        choice = req.tool_choice or "auto"
        forced = ""
        if choice != "auto" and choice != "none":
            if not tool_names:
                raise APIError(400, "tool_choice needs `tools`", "invalid_request", "tool_choice")
            forced = f"\n\n{TOOL_CALLS_OPEN}\n"
            if isinstance(choice, dict):
                name = (choice.get("function") or {}).get("name")
                if name not in tool_names:
                    raise APIError(400, f"tool_choice names {name!r}, which is not among the tools {tool_names}",
                                   "invalid_request", "tool_choice")
                forced += f'{INVOKE_OPEN} name="{name}">\n'
            mode, effort = "chat", None  # the call starts right after the hand-over: no reasoning first
        if tool_names and choice != "none":
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            if messages[0]["role"] == "system":
                messages[0]["tools"] = tools
            else:
                messages.insert(0, {"role": "system", "content": "", "tools": tools})
        try:
            prompt = encode_messages(messages, thinking_mode=mode, reasoning_effort=effort) + forced
        except ChatFormatError as e:
            raise APIError(400, str(e), "invalid_messages", "messages") from None
        ids = tokens.encode(prompt)
        params = _params(req, len(ids), req.max_completion_tokens or req.max_tokens,
                         (req.top_logprobs or 0) if req.logprobs else None, (tokens.eos_id,))
        handle, q = _submit(ids, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        keep_tools = choice != "none"

        def chunk(delta: dict, finish: str | None = None, logprobs=None) -> dict:
            c = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [c]}

        def deltas(events, n_calls: int) -> tuple[list[dict], int]:
            out = []
            for pe in events:
                if pe.kind in ("reasoning", "content"):
                    key = "reasoning_content" if pe.kind == "reasoning" else "content"
                    if out and list(out[-1]) == [key]:
                        out[-1][key] += pe.value
                    else:
                        out.append({key: pe.value})
                elif pe.kind == "tool_call" and keep_tools:
                    out.append({"tool_calls": [{"index": n_calls, "id": f"call_{uuid.uuid4().hex[:24]}",
                                                "type": "function", "function": pe.value["function"]}]})
                    n_calls += 1
            return out, n_calls

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def gen():
                parser = StreamingParser(mode)
                n_calls = 0
                first, n_calls = deltas(parser.feed(forced), n_calls)
                yield chunk({"role": "assistant", "content": ""})
                for d in first:
                    yield chunk(d)
                while True:
                    ev = await q.get()
                    if ev.finish_reason == "error":
                        yield _generation_error(ev)
                        return
                    parsed = parser.feed(ev.text) if ev.text else []
                    if ev.finished:
                        if ev.stop_reason == tokens.eos_id:
                            parsed += parser.feed(EOS)
                        parsed += parser.finish()
                    ds, n_calls = deltas(parsed, n_calls)
                    lps = {"content": _chat_logprobs([ev])} if req.logprobs and ev.logprobs else None
                    if lps and not ds:
                        ds = [{}]
                    for i, d in enumerate(ds):
                        yield chunk(d, logprobs=lps if i == 0 else None)
                    if ev.finished:
                        finish = "tool_calls" if n_calls else ("length" if ev.finish_reason == "length" else "stop")
                        yield chunk({}, finish)
                        if include_usage:
                            yield {"id": rid, "object": "chat.completion.chunk", "created": created,
                                   "model": model_name, "choices": [], "usage": _usage(ev)}
                        return
            return _stream(gen(), handle)

        events = await _collect(request, handle, q)
        last = events[-1]
        parser = StreamingParser(mode)
        parsed = parser.feed(forced + "".join(ev.text for ev in events))
        if last.stop_reason == tokens.eos_id:
            parsed += parser.feed(EOS)
        parsed += parser.finish()
        calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": tc["function"]}
                 for tc in parser.tool_calls] if keep_tools else []
        message = {"role": "assistant", "content": parser.content if parser.content or not calls else None}
        if mode == "thinking":
            message["reasoning_content"] = parser.reasoning_content
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else ("length" if last.finish_reason == "length" else "stop")
        choice_out = {"index": 0, "message": message, "finish_reason": finish,
                      "logprobs": {"content": _chat_logprobs(events)} if req.logprobs else None}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [choice_out], "usage": _usage(last)}

    # ------------------------------------------------------------------ /v1/completions
    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model)
        if isinstance(req.prompt, str):
            text = req.prompt if req.prompt.startswith(BOS) else BOS + req.prompt
            ids = tokens.encode(text)
        else:
            ids = list(req.prompt)
        params = _params(req, len(ids), req.max_tokens, req.logprobs)
        handle, q = _submit(ids, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = (req.prompt if isinstance(req.prompt, str) else tokenizer.decode(ids)) if req.echo else ""

        def legacy_logprobs(events: list[Event], offset: int) -> dict | None:
            if req.logprobs is None:
                return None
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for ev in events:
                for lp in ev.logprobs:
                    s = tokens.piece(lp.token)
                    out["tokens"].append(s)
                    out["token_logprobs"].append(lp.logprob)
                    out["top_logprobs"].append({tokens.piece(i): v for i, v in lp.top})
                    out["text_offset"].append(offset)
                    offset += len(s)
            return out

        def finish_of(ev: Event) -> str:
            return "length" if ev.finish_reason == "length" else "stop"

        if req.stream:
            async def gen():
                offset = len(echo)
                if echo:
                    yield {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                           "choices": [{"index": 0, "text": echo, "logprobs": None, "finish_reason": None}]}
                while True:
                    ev = await q.get()
                    if ev.finish_reason == "error":
                        yield _generation_error(ev)
                        return
                    lp = legacy_logprobs([ev], offset)
                    offset += len(ev.text)
                    if ev.text or lp or ev.finished:
                        yield {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [{"index": 0, "text": ev.text, "logprobs": lp,
                                            "finish_reason": finish_of(ev) if ev.finished else None}]}
                    if ev.finished:
                        if (req.stream_options or {}).get("include_usage"):
                            yield {"id": rid, "object": "text_completion", "created": created,
                                   "model": model_name, "choices": [], "usage": _usage(ev)}
                        return
            return _stream(gen(), handle)

        events = await _collect(request, handle, q)
        text = echo + "".join(ev.text for ev in events)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": legacy_logprobs(events, len(echo)),
                             "finish_reason": finish_of(events[-1])}],
                "usage": _usage(events[-1])}

    return app


def _reasoning_mode(req: ChatCompletionRequest, default: str) -> tuple[str, str | None]:
    """(thinking_mode, reasoning_effort) for the encoder: non-think, think-high or think-max.

    The switch: `thinking` (bool or {"type": "enabled"/"disabled"}) or chat_template_kwargs["thinking"];
    `reasoning_effort` "none" means off, "xhigh"/"max" think-max, any other value think-high (V4 has no
    lower level). Without either, the server's default applies."""
    think = None
    if isinstance(req.thinking, bool):
        think = req.thinking
    elif isinstance(req.thinking, dict):
        think = req.thinking.get("type") == "enabled"
    kwargs = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            think = bool(kwargs[key])
    effort = req.reasoning_effort
    if effort == "none":
        think = False
    if think is None:
        think = effort is not None or default != "off"
    if not think:
        return "chat", None
    if effort in ("xhigh", "max") or (effort is None and default == "max"):
        return "thinking", "max"
    return "thinking", "high"


def _prometheus(stats: dict, http_errors: dict[int, int]) -> str:
    lines = []

    def metric(name: str, kind: str, help_text: str, value, labels: str = "") -> None:
        if not any(line.startswith(f"# TYPE {name} ") for line in lines):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.append(f"{name}{labels} {value}")

    metric("dsv4_requests_running", "gauge", "requests in the running batch", stats["running"])
    metric("dsv4_requests_waiting", "gauge", "requests waiting for a slot", stats["waiting"])
    for reason, n in sorted(stats["finished"].items()):
        metric("dsv4_requests_finished_total", "counter", "finished requests by reason", n, f'{{reason="{reason}"}}')
    metric("dsv4_requests_rejected_total", "counter", "requests refused by the engine", stats["requests_rejected"])
    metric("dsv4_prompt_tokens_total", "counter", "prompt tokens of finished requests", stats["prompt_tokens"])
    metric("dsv4_generation_tokens_total", "counter", "generated tokens", stats["generation_tokens"])
    metric("dsv4_prefix_cache_queries_total", "counter", "prefix cache lookups", stats["prefix_queries"])
    metric("dsv4_prefix_cache_hits_total", "counter", "prefix cache hits", stats["prefix_hits"])
    metric("dsv4_prefix_cache_hit_tokens_total", "counter", "prompt tokens served from the prefix cache",
           stats["prefix_hit_tokens"])
    metric("dsv4_prefix_cache_bytes", "gauge", "bytes held by the in-memory prefix store",
           stats.get("prefix_store_bytes", 0))
    metric("dsv4_spec_draft_tokens_total", "counter", "MTP draft tokens verified", stats["spec_drafted"])
    metric("dsv4_spec_accepted_tokens_total", "counter", "MTP draft tokens accepted", stats["spec_accepted"])
    metric("dsv4_kv_cache_used_bytes", "gauge", "KV cache bytes of running requests", stats["kv_used_bytes"])
    metric("dsv4_kv_cache_reserved_bytes", "gauge", "KV cache bytes reserved by admission", stats["kv_reserved_bytes"])
    metric("dsv4_kv_cache_budget_bytes", "gauge", "KV cache budget", stats["kv_budget_bytes"])
    if "kv_pool_bytes" in stats:  # the paged pool: its size and slots
        metric("dsv4_kv_pool_bytes", "gauge", "bytes allocated by the paged KV pool", stats["kv_pool_bytes"])
        metric("dsv4_kv_pool_tokens", "gauge", "tokens the paged KV pool holds", stats["kv_pool_tokens"])
        metric("dsv4_kv_pool_slots", "gauge", "sequence slots of the paged KV pool", stats["kv_pool_slots"])
        metric("dsv4_kv_pool_slots_used", "gauge", "slots held by running requests", stats["kv_pool_slots_used"])
    metric("dsv4_time_to_first_token_seconds_sum", "counter", "sum of times to first token", stats["ttft_seconds_sum"])
    metric("dsv4_time_to_first_token_seconds_count", "counter", "requests with a first token", stats["ttft_count"])
    metric("dsv4_forward_passes_total", "counter", "model forward passes", stats["forward_passes"])
    for status, n in sorted(http_errors.items()):
        metric("dsv4_http_errors_total", "counter", "error responses by status", n, f'{{status="{status}"}}')
    return "\n".join(lines) + "\n"


def _generation_error(ev) -> dict:
    """The stream chunk that reports an engine failure in the middle of a streamed response."""
    return {"error": {"message": f"generation failed: {ev.error}", "type": "server_error", "param": None,
                      "code": "generation_error"}}
