"""The OpenAI wire format of the completions and chat completions routes: request schemas, error
bodies and response shapes (whole responses and server-sent event streams).

No Ray and no torch here; serve/openai_api.py uses it for its routes. Errors always have OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, so the official clients raise them with
the server's message.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
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
MAX_CHOICES = 16
"""Largest `n` of a chat completion (each choice is one row of a decode batch)."""
CHAT_ROLES = ("system", "developer", "user", "assistant")
"""Message roles a chat request may carry; `developer` (OpenAI's newer name for `system`) is
rendered as `system`, which is the role chat templates know."""


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


class _Sampling(BaseModel):
    """What a completion and a chat request share: the model, the sampling settings, the stop
    strings and streaming."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _tiny_is_greedy(cls, t: float) -> float:
        return _greedy_below(t)

    def stops(self) -> tuple[str, ...]:
        return _stop_strings(self.stop)


class CompletionRequest(_Sampling):
    """`POST /v1/completions` body. Fields the server cannot honour are rejected, not ignored."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def token_limit(self) -> tuple[int | None, str]:
        """(max_tokens, the parameter that set it), as for a chat request."""
        return self.max_tokens, "max_tokens"


class ChatRequest(_Sampling):
    """`POST /v1/chat/completions` body. `messages` is checked by hand (`_check_messages`), so that
    an error names the message and the field (`messages[1].role`)."""

    messages: list[Any]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict | None = None


    def token_limit(self) -> tuple[int | None, str]:
        """(the completion's token limit, the parameter that set it): `max_completion_tokens`
        (OpenAI's current name) over `max_tokens`; None lets the server choose."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def choice_seed(self, index: int) -> int | None:
        """Choice 0 decodes with `seed`, choice i with (seed + i) mod 2**64: n seeded choices
        differ from each other and each is reproducible."""
        if self.seed is None or index == 0:
            return self.seed
        return (self.seed + index) % 2**64

    def conversation(self) -> list[dict]:
        """The messages as chat templates take them: {role, content: str}; text parts are joined
        with newlines (as vLLM does), `developer` becomes `system`. Call after parsing."""
        return [{"role": "system" if m["role"] == "developer" else m["role"],
                 "content": m["content"] if isinstance(m["content"], str)
                 else "\n".join(part["text"] for part in m["content"])}
                for m in self.messages]


def _greedy_below(t: float) -> float:
    return 0.0 if t < GREEDY_BELOW else t


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The validated request, or ApiError(400) naming the field and what it must be (413 for a
    body over MAX_BODY_BYTES)."""
    req = _validated(CompletionRequest, _json_object(raw, example='"prompt": "..."'))
    _check_supported(req)
    return req


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The validated chat request, or ApiError(400/413) as parse_completion_request."""
    req = _validated(ChatRequest, _json_object(
        raw, example='"messages": [{"role": "user", "content": "..."}]'))
    _check_chat_supported(req)
    return req


def _json_object(raw: bytes, *, example: str) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES} "
                            "bytes: send fewer or shorter prompts per request",
                       code="request_too_large")
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, >4300-digit ints, deep nesting
        why = str(e)[:120] or "nested too deeply"
        raise ApiError(400, f"the request body is not valid JSON ({why}); send a JSON object like "
                            f'{{"model": "...", {example}}}') from None
    if not isinstance(data, dict):
        raise ApiError(400, f'the request body must be a JSON object like {{"model": "...", '
                            f'{example}}}')
    return data


def _validated(schema: type[BaseModel], data: dict):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> ApiError:
    """Pydantic's first error as a 400 naming the parameter (FastAPI would answer 422)."""
    first = e.errors()[0]
    loc = first.get("loc", ())
    param = str(loc[0]) if loc else None  # later parts name union members ("str", "list[str]")
    more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    if first["type"] == "missing":
        return ApiError(400, f"{param} is required{more}", param=param, code="missing_field")
    return ApiError(400, f"{param or 'body'}: {first['msg']}, got {_shown(first.get('input'))}"
                         f"{more}", param=param, code="invalid_value")


def _shown(value: Any) -> str:
    """A client's value as the error message quotes it (JSON, at most 80 characters)."""
    return json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]


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
    for text in req.prompts():
        _check_unicode(text, "prompt")
    _check_stops(req.stops())


def _check_chat_supported(req: ChatRequest) -> None:
    if req.logprobs or req.top_logprobs is not None:
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    if req.tools:
        raise ApiError(400, "tools (function calling) are not supported by this server; send "
                            "messages only", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise ApiError(400, f"response_format {req.response_format.get('type')!r} is not "
                            'supported; only {"type": "text"}', param="response_format")
    _check_messages(req.messages)
    _check_stops(req.stops())


def _check_messages(messages: list) -> None:
    """Each message is {role: one of CHAT_ROLES, content: a string or a list of text parts}."""
    if not messages:
        raise ApiError(400, 'messages is an empty list; send at least one message like '
                            '{"role": "user", "content": "..."}', param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad_message(f"{where} must be an object like {{\"role\": \"user\", "
                               f"\"content\": \"...\"}}, got {_shown(message)}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            tools = " (tool messages are not supported)" if role in ("tool", "function") else ""
            what = "it is missing" if role is None else f"got {_shown(role)}"
            raise _bad_message(f"{where}.role must be one of {', '.join(CHAT_ROLES)}{tools}; "
                               f"{what}")
        content = message.get("content")
        if isinstance(content, str):
            _check_unicode(content, "messages", what=f"{where}.content")
            continue
        if not isinstance(content, list):
            what = "it is missing" if content is None else f"got {_shown(content)}"
            raise _bad_message(f"{where}.content must be a string or a list of text parts "
                               f"[{{\"type\": \"text\", \"text\": \"...\"}}]; {what}")
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad_message(f"{where}.content[{j}] must be a text part "
                                   f"{{\"type\": \"text\", \"text\": \"...\"}} (this server "
                                   f"reads text only), got {_shown(part)}")
            _check_unicode(part["text"], "messages", what=f"{where}.content[{j}].text")


def _bad_message(message: str) -> ApiError:
    return ApiError(400, message, param="messages", code="invalid_value")


def _check_unicode(text: str, param: str, *, what: str | None = None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{what or param} holds an unpaired surrogate ({text[e.start]!a} at "
                            f"character {e.start + 1}), which is not text; send valid Unicode",
                       param=param) from None


def _check_stops(stops: tuple[str, ...]) -> None:
    for text in stops:
        _check_unicode(text, "stop")
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings, got "
                            f"{list(stops)!r}", param="stop")


def include_usage(req: CompletionRequest | ChatRequest) -> bool:
    """Whether a streamed response ends with a usage chunk (stream_options.include_usage)."""
    return bool(req.stream_options and req.stream_options.include_usage)


def new_completion_id(*, chat: bool = False) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def completion(cid: str, model: str, choices: list[dict], *, prompt_tokens: int,
               completion_tokens: int, created: int | None = None) -> dict:
    """A non-streamed response, or (with `usage` dropped by the caller) one streamed chunk."""
    return {"id": cid, "object": "text_completion", "created": created or int(time.time()),
            "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_completion(cid: str, model: str, results: list[tuple[str, str]], *, created: int,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """A non-streamed chat response; `results`: (text, finish_reason) per choice."""
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason} for i, (text, reason) in enumerate(results)]
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, choices: list[dict], *, created: int,
          usage_: dict | None = None, object_: str = "text_completion") -> str:
    """One server-sent event carrying a completion chunk."""
    body: dict[str, Any] = {"id": cid, "object": object_, "created": created,
                            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return sse(body)


@dataclass(frozen=True)
class Events:
    """The server-sent events of one streamed response. Completions: a chunk per piece of text,
    the last one carrying finish_reason. Chat: first a `{"role": "assistant", "content": ""}`
    delta per choice, then `{"content": ...}` deltas, then an empty delta with finish_reason.
    Both: a usage chunk with no choices when stream_options.include_usage, then [DONE]."""

    cid: str
    model: str
    created: int
    chat: bool
    include_usage: bool

    def start(self, choices: int) -> list[str]:
        return [self._chat_chunk(i, {"role": "assistant", "content": ""})
                for i in range(choices)] if self.chat else []

    def delta(self, index: int, text: str, finish_reason: str | None) -> list[str]:
        if not self.chat:
            return [chunk(self.cid, self.model, [choice(index, text, finish_reason)],
                          created=self.created)] if text or finish_reason else []
        out = [self._chat_chunk(index, {"content": text})] if text else []
        if finish_reason:
            out.append(self._chat_chunk(index, {}, finish_reason))
        return out

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return chunk(self.cid, self.model, [], created=self.created, object_=self._object,
                     usage_=usage(prompt_tokens, completion_tokens))

    @property
    def _object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chat_chunk(self, index: int, delta: dict, finish_reason: str | None = None) -> str:
        return chunk(self.cid, self.model, [{"index": index, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}],
                     created=self.created, object_=self._object)


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
