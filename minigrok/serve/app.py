"""The OpenAI-compatible HTTP face of the engine (FastAPI): /v1/models, /v1/completions, /v1/chat/completions.

Requests are checked where they enter: a body past `max_request_bytes` is refused (413) before it is parsed, bad
JSON or parameters get OpenAI-style errors naming the field (400), an unknown model 404, a full queue 429. Each
request's outputs come from the engine's thread through an asyncio queue; a client that goes away cancels its
request, which frees its rows of the cache before the next decode step.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from ..generate import RowSampling
from .engine import Engine, Output, Refused

CHAT_TEMPLATE_NAME = "chat_template.json"  # {"chat_template": "<Jinja template>"} beside a checkpoint's config.json
# For base models: one "<role>: <content>" line per message, then "assistant:" for the model to go on from.
DEFAULT_CHAT_TEMPLATE = "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}assistant:"
# OpenAI parameters this server does not implement: refused when given a value that would change the output.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions")
UNSUPPORTED += ("presence_penalty", "frequency_penalty")


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


class Outbox:
    """Outputs from the engine's thread to the requests' queues on the event loop: one wakeup of the loop hands over
    all the outputs that came since the last (a decode step's, for every row), not one wakeup each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending, self.lock = loop, [], threading.Lock()

    def put(self, queue: asyncio.Queue, output: Output) -> None:
        with self.lock:
            self.pending.append((queue, output))
            if len(self.pending) > 1:  # a handover is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self.hand_over)
        except RuntimeError:  # the event loop has closed: nobody waits for these outputs any more
            with self.lock:
                self.pending.clear()

    def hand_over(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, output in items:
            queue.put_nowait(output)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Parameters(BaseModel):
    """What both endpoints take; other fields that clients send are ignored, except the UNSUPPORTED ones."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: Any = None  # a string or a list of up to 4 strings, checked by stop_strings
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: int | None = Field(None, ge=1, le=1)


class CompletionParameters(Parameters):
    prompt: Any  # a string, a list of strings, a list of token ids or a list of such lists (completion_prompts)


class ChatParameters(Parameters):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def parse(kind: type[Parameters], body: dict) -> Parameters:
    """The request's parameters, or an ApiError naming the first bad field, its value and what it should be."""
    try:
        params = kind.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        value = "" if first["type"] == "missing" else f"={json.dumps(first.get('input'), default=str)[:100]}"
        raise ApiError(400, f"{field}{value}: {first['msg']}", param=field, code="invalid_value") from None
    for name in UNSUPPORTED:
        if (params.model_extra or {}).get(name):
            raise ApiError(400, f"{name} is not supported by this server: leave it out", param=name)
    return params


def stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop={json.dumps(stop)[:100]}: give a non-empty string or a list of up to 4", "stop")
    return tuple(stops)


def encode(tokenizer, text: str, field: str) -> list[int]:
    """Token ids of `text` (empty text: the start of a document, as `minigrok generate` begins)."""
    try:
        return tokenizer.encode(text) if text else [tokenizer.eos_id]
    except (UnicodeError, ValueError) as error:
        raise ApiError(400, f"{field} cannot be encoded by the model's tokenizer: {error}", field) from None


def completion_prompts(tokenizer, prompt: Any) -> list[list[int]]:
    """Token ids of each prompt of a completion request."""
    if isinstance(prompt, str):
        return [encode(tokenizer, prompt, "prompt")]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [encode(tokenizer, p, f"prompt.{i}") for i, p in enumerate(prompt)]

    def is_ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)

    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return prompt
    raise ApiError(
        400,
        f"prompt={json.dumps(prompt)[:100]}: give a string, a list of strings, or (lists of) token ids",
        "prompt",
    )


def message_text(message: dict, index: int) -> dict[str, str]:
    """{"role", "content"} of a chat message; content a string or a list of {"type": "text", "text"} parts."""
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise ApiError(400, f"messages.{index}.role={json.dumps(role)}: use system, user, assistant or tool", "role")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(part.get("text", "")) for part in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(
            400,
            f"messages.{index}.content={json.dumps(content)[:100]}: give a string or a list of text parts",
            f"messages.{index}.content",
        )
    return {"role": role, "content": content}


def load_chat_template(checkpoint: Path) -> str:
    """The checkpoint's chat template (chat_template.json), else the plain default for base models."""
    from ..checkpoint import read_json

    path = checkpoint / CHAT_TEMPLATE_NAME
    if not path.is_file():
        return DEFAULT_CHAT_TEMPLATE
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
        raise ValueError(f'{path} must hold a JSON object {{"chat_template": "<Jinja template>"}}: fix or remove it')
    return data["chat_template"]


def compile_template(template: str):
    """A Jinja template in a sandbox (a checkpoint's template is data, not code to trust)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    except jinja2.TemplateError as error:
        raise ValueError(f"the chat template does not parse ({error}): fix {CHAT_TEMPLATE_NAME}") from None


async def read_body(request: Request, limit: int) -> dict:
    """The request's JSON object, refused past `limit` bytes before more is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body of {declared} bytes exceeds --max-request-bytes={limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds --max-request-bytes={limit}")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error}): send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body is a JSON {type(data).__name__}, not an object of parameters")
    return data


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def build_app(engine: Engine, model_name: str, chat_template: str, max_request_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app serving `engine`'s model as `model_name`; the engine's loop runs for the app's lifetime."""
    template = compile_template(chat_template)
    tokenizer, max_seq_len = engine.tokenizer, engine.model.config.max_seq_len

    outbox = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal outbox
        outbox = Outbox(asyncio.get_running_loop())
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="minigrok", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, lambda request, error: error.response())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return ApiError(500, f"the server failed on this request: {type(error).__name__}: {error}").response()

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "minigrok", "max_model_len": max_seq_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.stats()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        params = parse(CompletionParameters, await read_body(request, max_request_bytes))
        check_model(params)
        prompts = completion_prompts(tokenizer, params.prompt)
        default = max(1, min(16, max_seq_len - max(len(prompt) for prompt in prompts)))
        return await respond(request, params, prompts, params.max_tokens or default, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        params = parse(ChatParameters, await read_body(request, max_request_bytes))
        check_model(params)
        messages = [message_text(message, index) for index, message in enumerate(params.messages)]
        try:
            text = template.render(messages=messages, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - a template may raise on messages it does not take
            raise ApiError(400, f"the chat template refused these messages: {error}", "messages") from None
        prompt = encode(tokenizer, text, "messages")
        max_tokens = params.max_completion_tokens or params.max_tokens or max(1, max_seq_len - len(prompt))
        return await respond(request, params, [prompt], max_tokens, chat=True)

    def check_model(params: Parameters) -> None:
        if params.model != model_name:
            raise ApiError(
                404,
                f"the model {params.model!r} does not exist: this server serves {model_name!r} (see GET /v1/models)",
                "model",
                "model_not_found",
            )

    async def respond(request: Request, params: Parameters, prompts: list[list[int]], max_tokens: int, chat: bool):
        """Submit the request; answer with one JSON response, or with server-sent events when it streams."""
        temperature = 1.0 if params.temperature is None else params.temperature
        sampling = RowSampling(max_tokens, temperature, None, params.top_p, (tokenizer.eos_id,))
        queue = asyncio.Queue()
        try:
            job = engine.submit(
                prompts,
                sampling,
                functools.partial(outbox.put, queue),
                params.n,
                params.seed,
                stop_strings(params.stop),
            )
        except Refused as error:
            raise ApiError(error.status, str(error), error.param, error.code) from None
        choices = len(prompts) * params.n
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        prompt_tokens = sum(len(prompt) for prompt in prompts)

        def usage(tokens: list[int]) -> dict:
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": sum(tokens),
                "total_tokens": prompt_tokens + sum(tokens),
            }

        if params.stream:
            include_usage = params.stream_options is not None and params.stream_options.include_usage
            events = stream(job, queue, head, choices, chat, usage if include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream")
        texts, finish, tokens = [""] * choices, [None] * choices, [0] * choices
        try:
            while None in finish:
                output = await next_output(queue, request)
                if output is None:  # the client went away
                    return None
                if output.finish_reason == "error":
                    raise ApiError(500, output.error)
                texts[output.index] += output.text
                finish[output.index], tokens[output.index] = output.finish_reason, output.tokens
        finally:
            engine.cancel(job)
        if chat:
            bodies = [{"message": {"role": "assistant", "content": text}} for text in texts]
        else:
            bodies = [{"text": text} for text in texts]
        out = [{"index": i, **body, "logprobs": None, "finish_reason": finish[i]} for i, body in enumerate(bodies)]
        return head | {"choices": out, "usage": usage(tokens)}

    async def stream(job, queue: asyncio.Queue, head: dict, choices: int, chat: bool, usage):
        """Server-sent events of the outputs as they come, then `data: [DONE]`; leaving early cancels the job."""
        head = head | {"object": "chat.completion.chunk"} if chat else head
        extra = {"usage": None} if usage else {}
        finish, tokens = [None] * choices, [0] * choices
        try:
            if chat:  # the role first, as OpenAI sends it
                for index in range(choices):
                    delta = {"role": "assistant", "content": ""}
                    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                    yield sse(head | {"choices": [choice]} | extra)
            while None in finish:
                output = await queue.get()
                if output.finish_reason == "error":
                    yield sse(ApiError(500, output.error).response().body.decode())
                    return
                finish[output.index], tokens[output.index] = output.finish_reason, output.tokens
                body = ({"delta": {"content": output.text} if output.text else {}}) if chat else {"text": output.text}
                choice = {"index": output.index, **body, "logprobs": None, "finish_reason": output.finish_reason}
                yield sse(head | {"choices": [choice]} | extra)
            if usage:
                yield sse(head | {"choices": [], "usage": usage(tokens)})
            yield sse("[DONE]")
        finally:
            engine.cancel(job)

    return app


async def next_output(queue: asyncio.Queue, request: Request) -> Output | None:
    """The next output, or None once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:  # noqa: UP041 - not TimeoutError itself before Python 3.11
            if await request.is_disconnected():
                return None
