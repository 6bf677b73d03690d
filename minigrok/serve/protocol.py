"""What the OpenAI-compatible endpoints take, checked where it enters: the request body (refused past
`--max-request-bytes` before it is parsed, 413), its JSON and parameters (400, naming the field and the value), the
prompts and chat messages, and the chat template that turns messages into a prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
