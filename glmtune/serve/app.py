"""The HTTP side of ``glmtune serve``: OpenAI's chat and completions API on FastAPI.

Requests are checked here (model name, roles, types, context length) and answered with
OpenAI's error shape and a 4xx; only then do they reach the engine's queue. Generation
runs in the engine's worker thread and hands text back to the request's event loop.
Prompts and answers are logged only with ``--log-prompts``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from glmtune.data.sample import Message
from glmtune.errors import GlmtuneError
from glmtune.infer.predict import Answer, Sampling
from glmtune.serve.engine import Engine, Job, QueueFull, ServedModel

log = logging.getLogger("glmtune.serve")


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ------------------------------------------------------------ request bodies
class _Body(BaseModel):
    # strict: "5" is not a number and "yes" not a boolean; unknown OpenAI fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)  # greedy unless asked: as `predict`
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, "stop: at most 4 non-empty strings", param="stop")
        return Sampling(max_new_tokens=max_tokens, temperature=self.temperature,
                        top_p=self.top_p, seed=self.seed, stop=tuple(stop))


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # newer name of max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[str]


# ---------------------------------------------------------------------- app
def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The API over ``engine``; with ``api_key`` every route but /health needs it."""
    app = FastAPI(title="glmtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    api_key = api_key or os.environ.get("GLMTUNE_API_KEY") or None
    created = int(time.time())

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                  api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        log.error("request failed: %s", exc, exc_info=exc)
        return ApiError(500, f"internal error ({type(exc).__name__}); the server logged it",
                        kind="server_error").response()

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "glmtune",
             "parent": None if m.adapter is None else engine.base_name}
            for name, m in engine.models.items()]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    async def one_model(name: str):
        return next(m for m in (await models())["data"] if m["id"] == _model(engine, name).name)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request):
        model = _model(engine, body.model)
        messages = [Message(m.role, m.text()) for m in body.messages]
        try:
            ids = engine.prompt_ids(model, messages)
        except GlmtuneError as exc:  # roles out of order, a conversation not ending with user
            raise ApiError(400, str(exc), param="messages") from exc
        limit = body.max_completion_tokens or body.max_tokens
        sampling = body.sampling(_limit(engine, ids, limit, "messages"))
        if engine.config.log_prompts:
            log.info("chat %s: %s", model.name, json.dumps(
                [m.__dict__ for m in messages], ensure_ascii=False))
        return await _answer(engine, model, ids, sampling, body, request, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        model = _model(engine, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got {len(prompts)}",
                           param="prompt")
        if not prompts[0]:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        ids = engine.text_ids(prompts[0])
        sampling = body.sampling(_limit(engine, ids, body.max_tokens, "prompt"))
        if engine.config.log_prompts:
            log.info("completion %s: %s", model.name, json.dumps(prompts[0], ensure_ascii=False))
        return await _answer(engine, model, ids, sampling, body, request, chat=False)

    return app


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart"}


def _validation_error(exc: RequestValidationError) -> ApiError:
    problems, param = [], None
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx", {}).get("error", "")
            return ApiError(400, f"malformed JSON in the request body: {ctx}".rstrip(": "),
                            code="invalid_json")
        # a union's members add their type to the location ("content.str"): keep the field path
        where = ".".join(p for p in loc if p not in _TYPE_TAGS and "[" not in p)
        param = param or where or None
        problems.append(f"{where or 'body'}: {error.get('msg')}")
    unique = list(dict.fromkeys(problems))
    return ApiError(400, "invalid request: " + "; ".join(unique), param=param)


def _model(engine: Engine, name: str) -> ServedModel:
    model = engine.models.get(name)
    if model is None:
        raise ApiError(404, f"model {name!r} is not served here; served models: "
                            f"{', '.join(engine.models)}", param="model", code="model_not_found")
    return model


def _limit(engine: Engine, ids: list[int], asked: int | None, what: str) -> int:
    """The answer's token limit; a request that cannot fit the model's context is refused."""
    context = engine.context
    if context is None:
        return asked or engine.config.max_new_tokens
    room = context - len(ids)
    if room < 1:
        raise ApiError(400, f"{what}: {len(ids)} tokens fill the model's context of {context} "
                            "tokens", param=what, code="context_length_exceeded")
    if asked is not None and asked > room:
        raise ApiError(400, f"max_tokens: {asked} new tokens after a {len(ids)}-token prompt "
                            f"exceed the model's context of {context} tokens (at most {room})",
                       param="max_tokens", code="context_length_exceeded")
    return asked or min(engine.config.max_new_tokens, room)


class _Done:
    def __init__(self, result):
        self.result = result


async def _answer(engine: Engine, model: ServedModel, ids: list[int], sampling: Sampling,
                  body: _Generation, request: Request, chat: bool):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def hand_over(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone: the server is shutting down
            pass

    job = Job(model, ids, sampling, on_text=hand_over, on_done=lambda r: hand_over(_Done(r)))
    try:
        engine.submit(job)
    except QueueFull as exc:
        raise ApiError(429, f"the server is busy ({engine.config.queue_size} requests already "
                            f"wait); retry in {exc.retry_after} s", kind="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from exc
    started = time.monotonic()
    reply = _Reply(model.name, chat)
    if not body.stream:
        async def watch() -> None:  # the body is read: the next message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.cancel(job)  # a client that left frees its place in the queue or batch

        watcher = asyncio.create_task(watch())
        try:
            while not isinstance(event := await events.get(), _Done):
                pass
        finally:
            watcher.cancel()
        answer = _result(event.result)
        _log(engine, model, answer, started)
        return reply.whole(answer)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def sse():
        try:
            yield reply.chunk("", first=True)
            while not isinstance(event := await events.get(), _Done):
                yield reply.chunk(event)
            try:
                answer = _result(event.result)
            except ApiError as exc:
                yield _sse(exc.body())
            else:
                _log(engine, model, answer, started)
                yield reply.chunk(None, finish=answer)
                if include_usage:
                    yield reply.usage_chunk(answer)
            yield "data: [DONE]\n\n"
        finally:
            # A client that leaves mid-stream cancels this generator: its row stops at once.
            engine.cancel(job)

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _result(result) -> Answer:
    if isinstance(result, Answer):
        return result
    if isinstance(result, GlmtuneError):
        raise ApiError(503, str(result), kind="server_error")
    raise ApiError(500, f"generation failed ({type(result).__name__}); the server logged it",
                   kind="server_error")


def _log(engine: Engine, model: ServedModel, answer: Answer, started: float) -> None:
    log.info("%s: %d prompt + %d completion tokens, %s, %.2f s", model.name,
             answer.prompt_tokens, answer.completion_tokens, answer.finish_reason,
             time.monotonic() - started)
    if engine.config.log_prompts:
        log.info("answer: %s", json.dumps(answer.text, ensure_ascii=False))


def _reason(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Reply:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, model: str, chat: bool):
        self.model, self.is_chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def _usage(answer: Answer) -> dict:
        return {"prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens}

    def whole(self, answer: Answer) -> dict:
        reason = _reason(answer)
        if self.is_chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                      "finish_reason": reason, "logprobs": None}
            return {**self._head("chat.completion"), "choices": [choice],
                    "usage": self._usage(answer)}
        choice = {"index": 0, "text": answer.text, "finish_reason": reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice],
                "usage": self._usage(answer)}

    def chunk(self, text: str | None, first: bool = False, finish: Answer | None = None) -> str:
        """A piece of the answer; the last chunk (``finish``) carries the reason and, so that
        every answer has it, the usage (OpenAI sends usage only with include_usage)."""
        reason = None if finish is None else _reason(finish)
        usage = {} if finish is None else {"usage": self._usage(finish)}
        if self.is_chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return _sse({**self._head("chat.completion.chunk"), "choices": [choice], **usage})
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return _sse({**self._head("text_completion"), "choices": [choice], **usage})

    def usage_chunk(self, answer: Answer) -> str:
        kind = "chat.completion.chunk" if self.is_chat else "text_completion"
        return _sse({**self._head(kind), "choices": [], "usage": self._usage(answer)})
