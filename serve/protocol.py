"""The OpenAI completions wire format: the request schema, error bodies and response shapes.

No Ray and no torch here; serve/openai_api.py uses it for its routes. Errors always have OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, so the official clients raise them with
the server's message.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body accepted (413 above it): room for many prompts of serve.max_prompt_tokens,
while a runaway client cannot make a replica parse and tokenize gigabytes."""
GREEDY_BELOW = 1e-6
"""A temperature above 0 but below this decodes greedily: logits / 1e-270 overflow to inf (a NaN
softmax), and any temperature this small picks the argmax anyway."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds torch.Generator.manual_seed takes; anything else would fail inside the decode (a 500)."""


class ApiError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                       code, kind)

    def body(self) -> dict:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """`POST /v1/completions` body. Fields the server cannot honour are rejected, not ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("temperature")
    @classmethod
    def _tiny_is_greedy(cls, t: float) -> float:
        return 0.0 if t < GREEDY_BELOW else t

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The validated request, or ApiError(400) naming the field and what it must be (413 for a
    body over MAX_BODY_BYTES)."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES} "
                            "bytes: send fewer or shorter prompts per request",
                       code="request_too_large")
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, >4300-digit ints, deep nesting
        why = str(e)[:120] or "nested too deeply"
        raise ApiError(400, f"the request body is not valid JSON ({why}); send a JSON object like "
                            '{"model": "...", "prompt": "..."}') from None
    if not isinstance(data, dict):
        raise ApiError(400, 'the request body must be a JSON object like {"model": "...", '
                            '"prompt": "..."}')
    try:
        req = CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    _check_supported(req)
    return req


def validation_error(e: ValidationError) -> ApiError:
    """Pydantic's first error as a 400 naming the parameter (FastAPI would answer 422)."""
    first = e.errors()[0]
    loc = first.get("loc", ())
    param = str(loc[0]) if loc else None  # later parts name union members ("str", "list[str]")
    more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    if first["type"] == "missing":
        return ApiError(400, f"{param} is required{more}", param=param, code="missing_field")
    given = first.get("input")
    shown = json.dumps(given)[:80] if _jsonable(given) else repr(given)[:80]
    return ApiError(400, f"{param or 'body'}: {first['msg']}, got {shown}{more}", param=param,
                    code="invalid_value")


def _check_supported(req: CompletionRequest) -> None:
    if req.n != 1:
        raise ApiError(400, f"n={req.n} is not supported: this server returns one completion per "
                            "prompt (n=1); send the request several times with different seeds",
                       param="n")
    if req.best_of not in (None, 1):
        raise ApiError(400, "best_of is not supported (only 1)", param="best_of")
    if req.echo:
        raise ApiError(400, "echo is not supported; the prompt is not repeated in the output",
                       param="echo")
    if req.logprobs is not None:
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    if req.suffix:
        raise ApiError(400, "suffix (insertion) is not supported", param="suffix")
    if not req.prompts():
        raise ApiError(400, "prompt is an empty list; send a string or a list of strings",
                       param="prompt")
    for param, texts in (("prompt", req.prompts()), ("stop", req.stops())):
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"{param} holds an unpaired surrogate ({text[e.start]!a} at "
                                    f"character {e.start + 1}), which is not text; send valid "
                                    "Unicode", param=param) from None
    stops = req.stops()
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings, got "
                            f"{list(stops)!r}", param="stop")


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def completion(cid: str, model: str, choices: list[dict], *, prompt_tokens: int,
               completion_tokens: int, created: int | None = None) -> dict:
    """A non-streamed response, or (with `usage` dropped by the caller) one streamed chunk."""
    return {"id": cid, "object": "text_completion", "created": created or int(time.time()),
            "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, choices: list[dict], *, created: int,
          usage_: dict | None = None) -> str:
    """One server-sent event carrying a completion chunk."""
    body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created,
                            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return sse(body)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


DONE = sse("[DONE]")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
