"""The OpenAI-compatible HTTP face of the engine (FastAPI): /v1/models, /v1/completions, /v1/chat/completions.

Each request's outputs come from the engine's thread through an asyncio queue; a client that goes away cancels its
request, which frees its rows of the cache before the next decode step. What a request may hold, and the errors it
gets otherwise, are in `protocol`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..generate import RowSampling
from .engine import Engine, Output, Refused
from .protocol import (
    ApiError,
    ChatParameters,
    CompletionParameters,
    Parameters,
    compile_template,
    completion_prompts,
    encode,
    message_text,
    parse,
    read_body,
    stop_strings,
)


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
