"""The Serve application end to end: real Ray Serve, real HTTP, the official `openai` client, and
the `raydistill serve` / `raydistill query` commands as subprocesses."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from orchestrator.config import ServeConfig
from orchestrator.errors import RaydistillError
from orchestrator.winners import ServedModel, find_models
from tests.conftest import free_port, serve_settings, server_up, wait_until
from tests.serve.conftest import CHAT, CONVERSATION

RAYDISTILL = str(Path(sys.executable).with_name("raydistill"))
A, B = "t0001-1x128", "t0002-1x128"


@pytest.fixture(scope="module")
def server(students, chat_student, ray_session):
    """The application on a free port, serving the sweep's two winners (found via winners.json;
    no chat template) and the chat student."""
    from serve import app

    models = find_models(students["sweep"]) + [ServedModel(id=CHAT, path=chat_student["path"],
                                                           rank=3)]
    url = app.start(models, serve_settings())
    yield url
    app.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(students):
    """The students loaded in this process, for reference outputs."""
    from serve.generate import load_student

    return {mid: load_student(path) for mid, path in students["paths"].items()}


def _greedy(student, prompt: str, n: int) -> str:
    from serve.generate import decode_text, encode_prompt

    ids = torch.tensor([encode_prompt(student, prompt)])
    with torch.no_grad():
        out = student.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=n)
    return decode_text(student, out[0, ids.shape[1]:].tolist())


def _error(response: httpx.Response, status: int) -> str:
    """The OpenAI-shaped error's message, after checking the status and the shape."""
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err["message"]


def test_health_and_model_list(server, client):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["models"] == [A, B, CHAT]
    assert {"requests", "batches", "max_batch_size"} <= set(health["stats"])
    listed = client.models.list().data
    assert [m.id for m in listed] == [A, B, CHAT] and listed[0].owned_by == "raydistill"


def test_greedy_completion_equals_generate_streamed_or_not(client, local):
    want = _greedy(local[A], "def f(", 20)
    out = client.completions.create(model=A, prompt="def f(", max_tokens=20, temperature=0)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 20 and out.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model=A, prompt="def f(", max_tokens=20,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2


def test_list_of_prompts(client, local):
    prompts = ["import os", "class A:"]
    out = client.completions.create(model=A, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [
        _greedy(local[A], p, 8) for p in prompts]


def test_seed_reproduces_sampling(client):
    def sample(seed):
        return client.completions.create(model=A, prompt="def f(", max_tokens=16,
                                         temperature=1.0, seed=seed).choices[0].text

    assert sample(11) == sample(11) != sample(12)


def test_stop_strings(client, local):
    full = _greedy(local[A], "def f(", 30)
    stop = full[8:11]
    want = full[:full.find(stop)]
    out = client.completions.create(model=A, prompt="def f(", max_tokens=30, temperature=0,
                                    stop=[stop, "@@@@"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (want, "stop")
    chunks = client.completions.create(model=A, prompt="def f(", max_tokens=30, temperature=0,
                                       stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want


def test_two_students_multiplexed(server, client, local):
    for mid in (A, B):
        out = client.completions.create(model=mid, prompt="import ", max_tokens=12, temperature=0)
        assert out.model == mid and out.choices[0].text == _greedy(local[mid], "import ", 12)
    assert set(httpx.get(f"{server}/health").json()["loaded"]) == {A, B}


def test_request_errors_have_openai_shape(server):
    post = lambda body, **kw: httpx.post(f"{server}/v1/completions", json=body, timeout=30, **kw)
    msg = _error(post({"model": "nope", "prompt": "x"}), 404)
    assert A in msg and B in msg
    assert "limit is 100" in _error(post({"model": A, "prompt": "x = 1\n" * 60}), 400)
    assert "limit of 200" in _error(post({"model": A, "prompt": "x", "max_tokens": 201}), 400)
    too_long = _error(post({"model": A, "prompt": "x = 1\n" * 15, "max_tokens": 200}), 400)
    assert "context of 256" in too_long and "max_tokens=" in too_long
    assert "JSON" in _error(httpx.post(f"{server}/v1/completions", content=b"{nope",
                                       headers={"content-type": "application/json"}), 400)
    for bad, param in [({"max_tokens": "ten"}, "max_tokens"), ({"temperature": -1}, "temperature"),
                       ({"top_p": 1.5}, "top_p"), ({"top_p": 0}, "top_p"),
                       ({"prompt": 5}, "prompt"), ({"stream": "yes"}, "stream"),
                       ({"stop": [""]}, "stop")]:
        r = post({"model": A, "prompt": "x", **bad})
        _error(r, 400)
        assert r.json()["error"]["param"] == param
    assert "n=1" in _error(post({"model": A, "prompt": "x", "n": 2}), 400)
    _error(post({"prompt": "x"}), 400)
    _error(httpx.get(f"{server}/v1/nothing"), 404)


def test_api_key(students, server):
    """A second application with a key, under /keyed on the same proxy."""
    from ray import serve

    from serve.app import build_app

    models = find_models(students["sweep"], top=1)
    serve.run(build_app(models, serve_settings(), api_key="sekrit"), name="keyed",
              route_prefix="/keyed", blocking=False)
    try:
        url = f"{server}/keyed"
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        body = {"model": A, "prompt": "x", "max_tokens": 2}
        assert "Authorization" in _error(httpx.post(f"{url}/v1/completions", json=body), 401)
        _error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        ok = httpx.post(f"{url}/v1/completions", json=body, timeout=30,
                        headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(f"{url}/health").status_code == 200  # stays open
    finally:
        serve.delete("keyed")


def test_concurrent_requests_are_batched(server, client):
    before = httpx.get(f"{server}/health").json()["stats"]

    def one(i: int) -> str:
        if i % 2:
            chunks = client.completions.create(model=A, prompt=f"x{i}", max_tokens=24,
                                               stream=True, seed=i)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=A, prompt=f"x{i}", max_tokens=24,
                                         seed=i).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert len(texts) == 8 and all(texts)
    after = httpx.get(f"{server}/health").json()["stats"]
    assert after["requests"] - before["requests"] == 8
    assert after["max_batch_size"] > 1
    assert after["batches"] - before["batches"] < 8  # some requests shared a batch


def test_query_command(server, local):
    done = subprocess.run([RAYDISTILL, "query", "def f(", "--url", server, "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == _greedy(local[A], "def f(", 8) + "\n"
    streamed = subprocess.run([RAYDISTILL, "query", "def f(", "--url", server, "--model", B,
                               "--max-tokens", "8", "--stream"],
                              capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0 and streamed.stdout == _greedy(local[B], "def f(", 8) + "\n"
    missing = subprocess.run([RAYDISTILL, "query", "x", "--url", server, "--model", "nope"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_query_command_without_a_server():
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([RAYDISTILL, "query", "x", "--url", url], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert f"no server at {url}" in done.stderr and "raydistill serve" in done.stderr


def test_busy_port_is_a_clear_error(students):
    from orchestrator.driver.serving import run_server

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RaydistillError, match=f"port {port}.*--set serve.port="):
            run_server(students["sweep"], ServeConfig(port=port), top=None)


@pytest.fixture(scope="module")
def chat_answer(chat_student):
    """The chat student's greedy answer to CONVERSATION from transformers' generate, told to stop
    at eos and <|im_end|>: (prompt ids, text, completion tokens including the <|im_end|>)."""
    from serve.chat import render
    from serve.generate import decode_text, load_student

    student = load_student(chat_student["path"])
    ids = render(student.tokenizer, CONVERSATION)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = student.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=20, pad_token_id=0,
                                     eos_token_id=sorted(student.end_of_turn_ids))
    said = out[0, len(ids):].tolist()
    assert said[-1] == chat_student["end_of_turn"]
    return ids, decode_text(student, said[:-1]), len(said)


def test_chat_greedy_stops_at_the_end_of_turn_streamed_or_not(client, chat_answer):
    """The student's template renders the prompt; the answer ends at <|im_end|> (not the eos),
    with no max_tokens given; the stream opens with the role, then content, then finish_reason."""
    ids, want, tokens = chat_answer
    out = client.chat.completions.create(model=CHAT, messages=CONVERSATION, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    message = out.choices[0].message
    assert (message.role, message.content, out.choices[0].finish_reason) == (
        "assistant", want, "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), tokens)
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=CONVERSATION, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "stop" and not last.choices[0].delta.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens


def test_chat_parameters(client, chat_answer):
    """Text parts read as a string; max_completion_tokens cuts ("length"); n choices, seeded:
    choice 0 is the n=1 answer of that seed, and the same request gives the same choices."""
    _, want, _ = chat_answer
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
    out = client.chat.completions.create(model=CHAT, messages=parts, temperature=0)
    assert out.choices[0].message.content == want
    cut = client.chat.completions.create(model=CHAT, messages=CONVERSATION, temperature=0,
                                         max_completion_tokens=2)
    assert (cut.choices[0].finish_reason, cut.usage.completion_tokens) == ("length", 2)

    def sample(n):
        out = client.chat.completions.create(model=CHAT, messages=CONVERSATION, n=n, seed=7,
                                             temperature=1.0, max_tokens=12)
        return [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]

    three = sample(3)
    assert len(three) == 3 and sample(3) == three and sample(1) == three[:1]
    streamed = client.chat.completions.create(model=CHAT, messages=CONVERSATION, n=3, seed=7,
                                              temperature=1.0, max_tokens=12, stream=True)
    texts = ["", "", ""]
    for c in streamed:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == three


def test_chat_errors_have_openai_shape(server, client):
    """A student without a chat template: a 400 that says so and names /v1/completions (the
    official client raises it with the message); bad messages and a too long chat prompt: 400s."""
    import openai

    with pytest.raises(openai.BadRequestError, match="has no chat template.*/v1/completions"):
        client.chat.completions.create(model=A, messages=CONVERSATION)
    post = lambda body: httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    r = post({"model": A, "messages": CONVERSATION})
    assert f"model '{A}' has no chat template" in _error(r, 400)
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (
        "model", "chat_template_missing")
    user = {"role": "user", "content": "hi"}
    for body, phrase in [({}, "messages is required"),
                         ({"messages": []}, "messages is an empty list"),
                         ({"messages": [{"role": "robot", "content": "hi"}]},
                          'messages[0].role must be one of system, developer, user, assistant; '
                          'got "robot"'),
                         ({"messages": [user, {"role": "user", "content": 5}]},
                          "messages[1].content must be a string or a list of text parts"),
                         ({"messages": [{"role": "user", "content": "x = 1\n" * 60}]},
                          "the chat prompt (the messages in c0003-chat's chat template) is"),
                         ({"messages": [user], "max_tokens": 201},
                          "max_tokens=201 is above this server's limit of 200")]:
        r = post({"model": CHAT, **body})
        assert phrase in _error(r, 400), body
    assert _error(post({"model": "nope", "messages": [user]}), 404)


@pytest.mark.slow
def test_serve_command_runs_until_interrupted(students, local):
    """`raydistill serve SWEEP` with its own local Ray: answers, then exits 0 on SIGINT."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([RAYDISTILL, "serve", students["sweep"], "--top", "1",
                             "--set", f"serve.port={port}", "--set", "serve.replica_cpus=0.5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server_up(url) or proc.poll() is not None, timeout_s=180)
        assert proc.poll() is None, proc.stdout.read()
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [A]
        out = httpx.post(f"{url}/v1/completions", timeout=60,
                         json={"model": A, "prompt": "def f(", "max_tokens": 6, "temperature": 0})
        assert out.json()["choices"][0]["text"] == _greedy(local[A], "def f(", 6)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        printed = proc.stdout.read()
        assert url in printed and "raydistill query" in printed and A in printed
        # a normal stop prints no noise: Serve's INFO lines, the controller's "failed" task
        assert "stopping the server" in printed and "graceful_shutdown" not in printed
        assert "Started Serve" not in printed and "Deleting app" not in printed, printed
    finally:
        if proc.poll() is None:  # only on failure: stop what the test started, by its group id
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_404_without_an_error_body_says_the_server_may_still_be_starting():
    """Serve's HTTP proxy answers a bare 404 until the app is deployed; raydistill's own 404s
    (an unknown model) carry an OpenAI error body and get no such hint."""
    import openai

    from serve.client import _status_message

    request = httpx.Request("POST", "http://127.0.0.1:8123/v1/completions")
    bare = openai.NotFoundError("Error code: 404", response=httpx.Response(404, request=request),
                                body=None)
    assert "still starting" in _status_message(bare, "http://127.0.0.1:8123")
    ours = openai.NotFoundError("Error code: 404", response=httpx.Response(404, request=request),
                                body={"error": {"message": "model 'nope' is not served"}})
    text = _status_message(ours, "http://127.0.0.1:8123")
    assert "model 'nope' is not served" in text and "still starting" not in text
