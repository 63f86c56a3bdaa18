"""Bad HTTP input against a real served student: one row per malformed request of
docs/bad-input.md, and hypothesis fuzzing of the routes (`/v1/completions` and
`/v1/chat/completions` streamed or not, `/v1/models`, `/health`, unknown routes and methods).
Never a 5xx; every 4xx carries OpenAI's error shape; the server keeps answering valid requests and
logs no internal error.

One keyed application (API key `sekrit`) serves the whole module: two students without a chat
template and the chat student (tests/serve/conftest.py); server limits are small (max_tokens 16,
max_prompt_tokens 100, context 256) so valid fuzz requests decode quickly.
"""

from __future__ import annotations

import json

import httpx
import pytest

from orchestrator.config import ServeConfig
from orchestrator.winners import ServedModel, find_models
from tests.conftest import free_port
from tests.serve.conftest import CHAT

A, B = "t0001-1x128", "t0002-1x128"
KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHAPE = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(students, chat_student, ray_session):
    from serve import app

    settings = ServeConfig(port=free_port(), replica_cpus=0.5, max_batch_size=8,
                           batch_wait_timeout_s=0.01, max_tokens=16, max_prompt_tokens=100)
    models = find_models(students["sweep"]) + [ServedModel(id=CHAT, path=chat_student["path"],
                                                           rank=3)]
    url = app.start(models, settings, api_key=KEY)
    yield url
    app.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def _shape(r: httpx.Response) -> dict:
    """The OpenAI error object of a 4xx answer (checked), or {} for any other answer."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    if r.status_code < 400:
        return {}
    err = r.json()["error"]
    assert set(err) == SHAPE, r.text
    assert isinstance(err["message"], str) and err["message"]
    return err


def _body(value) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


# --------------------------------------------------------------------------- one row per request

def P(**fields):
    """A completion body: model A, a short prompt, 2 tokens, with `fields` changed."""
    return {"model": A, "prompt": "def f(", "max_tokens": 2, **fields}


def C(**fields):
    """A chat body: the chat student, one user message, 2 tokens, with `fields` changed."""
    return {"model": CHAT, "messages": [{"role": "user", "content": "def f("}], "max_tokens": 2,
            **fields}


CHAT_URL = "/v1/chat/completions"
BIG = b'{"model": "' + A.encode() + b'", "prompt": "' + b"x " * (2 * 1024 * 1024 + 10) + b'"}'

REQUEST_CASES = [
    # (method, path, body, auth, status, key phrase, param)
    pytest.param("POST", "/v1/completions", b"{nope", True, 400, "is not valid JSON", None,
                 id="malformed-json"),
    pytest.param("POST", "/v1/completions", b"\xff\xfe", True, 400, "is not valid JSON", None,
                 id="body-not-utf8"),
    pytest.param("POST", "/v1/completions", b"[" * 50000, True, 400, "is not valid JSON", None,
                 id="json-nested-too-deep"),
    pytest.param("POST", "/v1/completions",
                 b'{"model": "a", "prompt": "x", "seed": ' + b"7" * 5000 + b"}", True, 400,
                 "is not valid JSON (Exceeds the limit (4300 digits)", None,
                 id="integer-of-5000-digits"),
    pytest.param("POST", "/v1/completions", [P()], True, 400, "must be a JSON object", None,
                 id="body-not-an-object"),
    pytest.param("POST", "/v1/completions", b"", True, 400, "must be a JSON object", None,
                 id="empty-body"),
    pytest.param("POST", "/v1/completions", {"prompt": "x"}, True, 400, "model is required",
                 "model", id="missing-model"),
    pytest.param("POST", "/v1/completions", P(model="nope"), True, 404,
                 f"model 'nope' does not exist; this server hosts {A}, {B}", "model",
                 id="unknown-model"),
    pytest.param("POST", "/v1/completions", {"model": A}, True, 400, "prompt is required",
                 "prompt", id="missing-prompt"),
    pytest.param("POST", "/v1/completions", P(prompt=5), True, 400,
                 "prompt: Input should be a valid string, got 5 (and 1 more problems)", "prompt",
                 id="prompt-wrong-type"),
    pytest.param("POST", "/v1/completions", P(prompt=["ok", 3]), True, 400, "prompt:", "prompt",
                 id="prompt-list-with-non-string"),
    pytest.param("POST", "/v1/completions", P(prompt=[]), True, 400,
                 "prompt is an empty list", "prompt", id="empty-prompt-list"),
    pytest.param("POST", "/v1/completions", P(prompt=""), True, 400,
                 "prompt is empty (0 tokens); send some text", "prompt", id="empty-prompt"),
    pytest.param("POST", "/v1/completions", P(prompt="x = 1\n" * 60), True, 400,
                 "tokens; the limit is 100 tokens (serve.max_prompt_tokens=100", "prompt",
                 id="prompt-too-long"),
    pytest.param("POST", "/v1/completions", P(prompt="a\ud800b"), True, 400,
                 "prompt holds an unpaired surrogate", "prompt", id="prompt-unpaired-surrogate"),
    pytest.param("POST", "/v1/completions", P(max_tokens="ten"), True, 400,
                 'max_tokens: Input should be a valid integer, got "ten"',
                 "max_tokens", id="max-tokens-wrong-type"),
    pytest.param("POST", "/v1/completions", P(max_tokens=0), True, 400,
                 "max_tokens: Input should be greater than or equal to 1, got 0", "max_tokens",
                 id="max-tokens-zero"),
    pytest.param("POST", "/v1/completions", P(max_tokens=17), True, 400,
                 "max_tokens=17 is above this server's limit of 16 (serve.max_tokens)",
                 "max_tokens", id="max-tokens-above-limit"),
    pytest.param("POST", "/v1/completions", P(temperature=-1), True, 400,
                 "temperature: Input should be greater than or equal to 0, got -1", "temperature",
                 id="temperature-negative"),
    pytest.param("POST", "/v1/completions", P(temperature=2.5), True, 400,
                 "temperature: Input should be less than or equal to 2, got 2.5", "temperature",
                 id="temperature-above-2"),
    pytest.param("POST", "/v1/completions", P(temperature="hot"), True, 400,
                 'temperature: Input should be a valid number, got "hot"',
                 "temperature", id="temperature-wrong-type"),
    pytest.param("POST", "/v1/completions", P(top_p=0), True, 400,
                 "top_p: Input should be greater than 0, got 0", "top_p", id="top-p-zero"),
    pytest.param("POST", "/v1/completions", P(top_p=1.5), True, 400,
                 "top_p: Input should be less than or equal to 1, got 1.5", "top_p",
                 id="top-p-above-1"),
    pytest.param("POST", "/v1/completions", P(seed=2**64), True, 400,
                 "seed: Input should be less than or equal to 18446744073709551615", "seed",
                 id="seed-out-of-range"),
    pytest.param("POST", "/v1/completions", P(stop=[""]), True, 400,
                 "stop takes 1 to 4 non-empty strings, got ['']", "stop", id="stop-empty-string"),
    pytest.param("POST", "/v1/completions", P(stop=list("abcde")), True, 400,
                 "stop takes 1 to 4 non-empty strings", "stop", id="stop-too-many"),
    pytest.param("POST", "/v1/completions", P(stream="yes"), True, 400,
                 'stream: Input should be a valid boolean, got "yes"', "stream",
                 id="stream-wrong-type"),
    pytest.param("POST", "/v1/completions", P(stream=True, temperature=-1), True, 400,
                 "temperature:", "temperature", id="bad-streamed-request"),
    pytest.param("POST", "/v1/completions", P(n=2), True, 400, "n=2 is not supported", "n",
                 id="n-above-1"),
    pytest.param("POST", "/v1/completions", P(echo=True), True, 400, "echo is not supported",
                 "echo", id="echo"),
    pytest.param("POST", "/v1/completions", P(logprobs=2), True, 400,
                 "logprobs are not supported", "logprobs", id="logprobs"),
    pytest.param("POST", "/v1/completions", BIG, True, 413,
                 "the limit is 4194304 bytes: send fewer or shorter prompts", None,
                 id="oversized-body"),
    pytest.param("GET", "/v1/completions", None, True, 405,
                 "GET /v1/completions: Method Not Allowed", None, id="wrong-method"),
    pytest.param("POST", "/v1/models", P(), True, 405, "POST /v1/models: Method Not Allowed",
                 None, id="wrong-method-models"),
    pytest.param("GET", "/v1/embeddings", None, True, 404,
                 "GET /v1/embeddings: Not Found; routes are GET /health, GET /v1/models, "
                 "POST /v1/completions, POST /v1/chat/completions", None,
                 id="unknown-route"),
    pytest.param("POST", "/v1/completions", P(), False, 401,
                 "missing or wrong API key: send the header `Authorization: Bearer <key>` with the "
                 "key the server read from $RAYDISTILL_API_KEY", None,
                 id="missing-api-key"),
    pytest.param("GET", "/v1/models", None, {"Authorization": "Bearer wrong"}, 401,
                 "missing or wrong API key", None, id="wrong-api-key"),
    pytest.param("GET", "/v1/models", None, {"Authorization": f"Basic {KEY}"}, 401,
                 "missing or wrong API key", None, id="wrong-auth-scheme"),
    # chat completions
    pytest.param("POST", CHAT_URL, b"{nope", True, 400,
                 'is not valid JSON (Expecting property name enclosed in double quotes: line 1 '
                 'column 2 (char 1)); send a JSON object like {"model": "...", "messages": [',
                 None, id="chat-malformed-json"),
    pytest.param("POST", CHAT_URL, {"model": CHAT}, True, 400, "messages is required",
                 "messages", id="chat-missing-messages"),
    pytest.param("POST", CHAT_URL, C(messages=[]), True, 400,
                 "messages is an empty list; send at least one message", "messages",
                 id="chat-empty-messages"),
    pytest.param("POST", CHAT_URL, C(messages="hi"), True, 400,
                 'messages: Input should be a valid list, got "hi"', "messages",
                 id="chat-messages-not-a-list"),
    pytest.param("POST", CHAT_URL, C(messages=["hi"]), True, 400,
                 'messages[0] must be an object like {"role": "user", "content": "..."}, got "hi"',
                 "messages", id="chat-message-not-an-object"),
    pytest.param("POST", CHAT_URL, C(messages=[{"role": "robot", "content": "x"}]), True, 400,
                 'messages[0].role must be one of system, developer, user, assistant; got "robot"',
                 "messages", id="chat-bad-role"),
    pytest.param("POST", CHAT_URL, C(messages=[{"content": "x"}]), True, 400,
                 "messages[0].role must be one of system, developer, user, assistant; it is "
                 "missing", "messages", id="chat-missing-role"),
    pytest.param("POST", CHAT_URL, C(messages=[{"role": "tool", "content": "x"}]), True, 400,
                 "(tool messages are not supported)", "messages", id="chat-tool-role"),
    pytest.param("POST", CHAT_URL, C(messages=[{"role": "user", "content": 5}]), True, 400,
                 "messages[0].content must be a string or a list of text parts "
                 '[{"type": "text", "text": "..."}]; got 5', "messages",
                 id="chat-content-not-a-string"),
    pytest.param("POST", CHAT_URL, C(messages=[{"role": "user"}]), True, 400,
                 "messages[0].content must be a string or a list of text parts", "messages",
                 id="chat-missing-content"),
    pytest.param("POST", CHAT_URL, C(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), True, 400,
                 'messages[0].content[0] must be a text part {"type": "text", "text": "..."} '
                 "(this server reads text only)", "messages", id="chat-image-part"),
    pytest.param("POST", CHAT_URL, C(messages=[{"role": "user", "content": "a\ud800b"}]), True,
                 400, "messages[0].content holds an unpaired surrogate", "messages",
                 id="chat-content-unpaired-surrogate"),
    pytest.param("POST", CHAT_URL, C(messages=[{"role": "user", "content": "x = 1\n" * 60}]),
                 True, 400, "the chat prompt (the messages in c0003-chat's chat template) is ",
                 "messages", id="chat-prompt-too-long"),
    pytest.param("POST", CHAT_URL, C(model=A), True, 400,
                 f"model '{A}' has no chat template (its tokenizer declares no chat_template), "
                 "so it cannot take messages; send the text as a prompt to POST /v1/completions "
                 "instead", "model", id="chat-student-without-template"),
    pytest.param("POST", CHAT_URL, C(model="nope"), True, 404, "model 'nope' does not exist",
                 "model", id="chat-unknown-model"),
    pytest.param("POST", CHAT_URL, C(max_tokens=None, max_completion_tokens=17), True, 400,
                 "max_completion_tokens=17 is above this server's limit of 16 (serve.max_tokens)",
                 "max_completion_tokens", id="chat-max-completion-tokens-above-limit"),
    pytest.param("POST", CHAT_URL, C(n=17), True, 400,
                 "n: Input should be less than or equal to 16, got 17", "n", id="chat-n-above-16"),
    pytest.param("POST", CHAT_URL, C(temperature=-1, stream=True), True, 400,
                 "temperature: Input should be greater than or equal to 0, got -1", "temperature",
                 id="chat-bad-streamed-request"),
    pytest.param("POST", CHAT_URL, C(tools=[{"type": "function"}]), True, 400,
                 "tools (function calling) are not supported", "tools", id="chat-tools"),
    pytest.param("POST", CHAT_URL, C(logprobs=True), True, 400,
                 "logprobs are not supported", "logprobs", id="chat-logprobs"),
    pytest.param("POST", CHAT_URL, C(response_format={"type": "json_object"}), True, 400,
                 "response_format 'json_object' is not supported", "response_format",
                 id="chat-response-format"),
    pytest.param("GET", CHAT_URL, None, True, 405,
                 "GET /v1/chat/completions: Method Not Allowed", None, id="chat-wrong-method"),
    pytest.param("POST", CHAT_URL, C(), False, 401, "missing or wrong API key", None,
                 id="chat-missing-api-key"),
]


CODES = {"unknown-model": "model_not_found", "prompt-too-long": "context_length_exceeded",
         "oversized-body": "request_too_large", "missing-api-key": "invalid_api_key",
         "max-tokens-above-limit": "max_tokens_too_large",
         "chat-prompt-too-long": "context_length_exceeded",
         "chat-student-without-template": "chat_template_missing",
         "chat-max-completion-tokens-above-limit": "max_tokens_too_large"}


@pytest.mark.parametrize("method, path, body, auth, status, phrase, param", REQUEST_CASES)
def test_bad_request(method, path, body, auth, status, phrase, param, http, request):
    headers = AUTH if auth is True else (auth or {})
    content = None if body is None else _body(body)
    r = http.request(method, path, content=content,
                     headers={**headers, "content-type": "application/json"})
    assert r.status_code == status, r.text[:300]
    err = _shape(r)
    assert phrase in err["message"], err["message"]
    assert err["param"] == param
    if request.node.callspec.id in CODES:
        assert err["code"] == CODES[request.node.callspec.id]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_health_is_open_and_valid_requests_still_work(http):
    """After the bad requests: /health needs no key; plain and streamed completions and chat
    completions work."""
    assert http.get("/health").json()["status"] == "ok"
    ok = http.post("/v1/completions", json=P(), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    streamed = _events(http.post("/v1/completions", json=P(stream=True), headers=AUTH))
    assert streamed[-1] == "[DONE]" and len(streamed) >= 2
    before = http.get("/health").json()["stats"]
    ok = http.post(CHAT_URL, json=C(), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    streamed = _events(http.post(CHAT_URL, json=C(stream=True), headers=AUTH), chat=True)
    assert streamed[-1] == "[DONE]" and len(streamed) >= 3
    after = http.get("/health").json()["stats"]  # chat requests pass admission control too
    assert after["admitted"] - before["admitted"] == 2 and after["in_flight"] == 0


# --------------------------------------------------------------------------- fuzzing

def _events(r: httpx.Response, *, chat: bool = False) -> list:
    """The data of each server-sent event of a 200 stream; none may be an error."""
    assert r.status_code == 200, r.text[:300]
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    kind = "chat.completion.chunk" if chat else "text_completion"
    for e in events[:-1]:
        chunk = json.loads(e)
        assert "error" not in chunk and chunk["object"] == kind, e
    return events


def _check(r: httpx.Response, body, *, chat: bool = False) -> None:
    """Never a 5xx; a 4xx has the OpenAI shape; a 200 is a well-formed completion (chat: with
    its n choices, each an assistant message, or in a stream opened by the role)."""
    _shape(r)
    if r.status_code != 200 or not isinstance(body, dict):
        return
    if chat:
        choices = body.get("n", 1)
    else:
        choices = len(body["prompt"]) if isinstance(body["prompt"], list) else 1
    if body.get("stream") is True:
        events = _events(r, chat=chat)
        assert events[-1] == "[DONE]"
        firsts = [json.loads(e)["choices"][0] for e in events[:-1] if json.loads(e)["choices"]]
        finished = {c["index"] for c in firsts if c["finish_reason"]}
        assert finished == set(range(choices))
        if chat:
            assert [c["delta"] for c in firsts[:choices]] == [
                {"role": "assistant", "content": ""}] * choices
    else:
        out = r.json()
        assert sorted(c["index"] for c in out["choices"]) == list(range(choices))
        assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"])
        if chat:
            assert all(c["message"]["role"] == "assistant" for c in out["choices"])


def _strategies():
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                     max_size=3),
        max_leaves=5)
    some_text = st.text(min_size=1, max_size=24)
    valid = {  # values the server accepts (small, so that decoding stays cheap)
        "model": st.sampled_from([A, B]),
        "prompt": some_text | st.lists(some_text, min_size=1, max_size=3),
        "max_tokens": st.integers(1, 6),
        "temperature": st.floats(0, 2) | st.integers(0, 2),
        "top_p": st.floats(0.05, 1),
        "seed": st.none() | st.integers(-(2**63), 2**64 - 1),
        "stop": st.none() | st.text(min_size=1, max_size=3)
        | st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=4),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    }
    nearby = {  # values near and past the edges, of the right type
        "model": st.sampled_from(["nope", "", A.upper()]),
        "prompt": st.just("") | st.just([]) | st.lists(st.text(max_size=4), max_size=3),
        "max_tokens": st.integers(-2, 18) | st.integers(),
        "temperature": st.floats() | st.integers(-3, 3),
        "top_p": st.floats(),
        "seed": st.integers(),
        "stop": st.just("") | st.lists(st.text(max_size=2), max_size=6),
        "n": st.integers(-1, 2), "best_of": st.integers(-1, 2), "logprobs": st.integers(-1, 2),
        "echo": st.booleans(), "suffix": st.text(max_size=3),
    }
    good = st.fixed_dictionaries(
        {"model": valid["model"], "prompt": valid["prompt"], "max_tokens": valid["max_tokens"]},
        optional={k: v for k, v in valid.items() if k not in ("model", "prompt", "max_tokens")})

    def spoil(body_and_change):
        body, (key, value) = body_and_change
        return {**body, key: value}

    one_off = st.tuples(good, st.sampled_from(sorted(nearby)).flatmap(
        lambda k: st.tuples(st.just(k), nearby[k] | json_values))).map(spoil)
    anything = st.fixed_dictionaries({}, optional={**{k: v | json_values for k, v in
                                                       nearby.items()}, "extra": json_values})
    return st, good | one_off | anything, json_values


def _settings(n: int):
    from hypothesis import HealthCheck, settings

    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def test_fuzz_completion_bodies(http):
    """Random completion bodies (plausible and random-typed values for every field, streamed or
    not): never a 5xx, every 4xx in OpenAI's shape, every 200 a complete completion."""
    from hypothesis import example, given

    st, bodies, _ = _strategies()

    @_settings(150)
    @given(body=bodies, keyed=st.sampled_from([True, True, True, False]))
    @example(body=P(seed=-(2**63), stream=True, stop="(",
                    stream_options={"include_usage": True}), keyed=True)
    @example(body=P(prompt=["", "x"]), keyed=True)
    @example(body=P(temperature=float("nan")), keyed=True)
    @example(body=P(temperature=3.6e-270), keyed=True)  # found by this fuzz: was a 500
    @example(body=P(model=A + "\ud800"), keyed=True)
    def fuzz(body, keyed):
        content = json.dumps(body).encode("utf-8", "surrogatepass")
        r = http.post("/v1/completions", content=content,
                      headers={**(AUTH if keyed else {}), "content-type": "application/json"})
        if not keyed:
            assert r.status_code == 401
        _check(r, body)

    fuzz()


def _chat_strategies():
    """Chat bodies: valid ones for the chat student, and ones with one field spoiled."""
    from hypothesis import strategies as st

    st_, _, json_values = _strategies()
    text = st.text(max_size=24)
    content = text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                              max_size=2)
    message = st.fixed_dictionaries({"role": st.sampled_from(
        ["system", "developer", "user", "assistant"]), "content": content})
    valid = {"messages": st.lists(message, min_size=1, max_size=3),
             "max_tokens": st.integers(1, 6), "max_completion_tokens": st.integers(1, 6),
             "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
             "seed": st.none() | st.integers(-(2**63), 2**64 - 1), "n": st.integers(1, 3),
             "stop": st.none() | st.text(min_size=1, max_size=3), "stream": st.booleans(),
             "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
    bad_message = st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["tool", "robot", ""]) | json_values,
        "content": json_values | st.lists(json_values, max_size=2)})
    nearby = {"model": st.sampled_from([A, "nope"]),
              "messages": st.just([]) | json_values | st.lists(bad_message | message, max_size=3),
              "max_tokens": st.integers(-1, 18), "max_completion_tokens": st.integers(-1, 18),
              "n": st.integers(-1, 18), "logprobs": st.booleans(), "tools": json_values,
              "response_format": json_values, "temperature": st.floats()}
    good = st.fixed_dictionaries(
        {"model": st.just(CHAT), "messages": valid["messages"]},
        optional={k: v for k, v in valid.items() if k != "messages"})
    one_off = st.tuples(good, st.sampled_from(sorted(nearby)).flatmap(
        lambda k: st.tuples(st.just(k), nearby[k]))).map(lambda b: {**b[0], b[1][0]: b[1][1]})
    return st_, good | one_off


def test_fuzz_chat_bodies(http):
    """Random chat bodies (valid conversations of text or text parts, n, streamed or not, and
    one field spoiled): never a 5xx, every 4xx in OpenAI's shape, every 200 a complete chat
    completion with its n choices."""
    from hypothesis import example, given

    st, bodies = _chat_strategies()
    statuses = []

    @_settings(100)
    @given(body=bodies)
    @example(body=C(n=3, stream=True, stream_options={"include_usage": True}, seed=-(2**63)))
    @example(body=C(messages=[{"role": "assistant", "content": [{"type": "text",
                                                                 "text": "\ud800"}]}]))
    @example(body=C(max_tokens=None, messages=[{"role": "user", "content": "x " * 45}]))
    def fuzz(body):
        content = json.dumps(body).encode("utf-8", "surrogatepass")
        r = http.post(CHAT_URL, content=content,
                      headers={**AUTH, "content-type": "application/json"})
        _check(r, body, chat=True)
        statuses.append(r.status_code)

    fuzz()
    assert statuses.count(200) >= 20 and statuses.count(400) >= 20  # both decoded and refused


def test_fuzz_raw_bodies_routes_and_methods(http):
    """Random bytes as a completion body, and random methods on known and unknown paths, with
    and without the key: never a 5xx, every 4xx in OpenAI's shape."""
    from hypothesis import given

    st, _, json_values = _strategies()
    paths = st.sampled_from(["/v1/completions", "/v1/models", "/health", "/v1", "/",
                             "/v1/completions/x", "/v1/chat/completions", "/V1/MODELS",
                             "/v1/chat"]) | \
        st.text("abcxyz019/_.%~", max_size=16).map(lambda p: "/" + p)
    methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    bodies = st.none() | st.binary(max_size=64) | json_values.map(
        lambda v: json.dumps(v).encode())

    @_settings(80)
    @given(method=methods, path=paths, body=bodies, keyed=st.booleans())
    def fuzz(method, path, body, keyed):
        r = http.request(method, path, content=body, headers=AUTH if keyed else {})
        _check(r, None)

    fuzz()

    @_settings(40)
    @given(body=st.binary(max_size=200), path=st.sampled_from(["/v1/completions", CHAT_URL]))
    def raw(body, path):
        r = http.post(path, content=body, headers=AUTH)
        assert r.status_code == 400
        _check(r, None)

    raw()


def test_after_fuzzing_the_server_answers_and_logged_no_internal_error(http):
    ok = http.post("/v1/completions", json=P(temperature=0), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    stats = http.get("/health").json()["stats"]
    assert stats["errors"] == 0 and stats["requests"] > 20
