"""Ask a served student from the command line, through the official `openai` client.

    raydistill query "def f(" [--model ID] [--url http://127.0.0.1:8000] [--stream]

The request carries the header `serve_multiplexed_model_id: <model>` too, so with several
replicas Ray Serve's proxy sends it to a replica that already holds that student.
"""

from __future__ import annotations

import os
import sys

from orchestrator.errors import RaydistillError
from orchestrator.program import command_name

API_KEY_ENV = "RAYDISTILL_API_KEY"
TIMEOUT_S = 120.0


def query(prompt: str, *, url: str, model: str | None = None, max_tokens: int = 64,
          temperature: float = 0.0, stream: bool = False, api_key: str | None = None) -> int:
    """Print the completion of `prompt` (token by token with `stream`); returns the exit code."""
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1",
                           api_key=api_key or os.environ.get(API_KEY_ENV) or "none",
                           max_retries=0, timeout=TIMEOUT_S)
    try:
        model = model or _first_model(client, url)
        request = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": temperature,
                   "extra_headers": {"serve_multiplexed_model_id": model}}
        if stream:
            for chunk in client.completions.create(stream=True, **request):
                for choice in chunk.choices:
                    sys.stdout.write(choice.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            out = client.completions.create(**request)
            print(out.choices[0].text)
    except openai.APITimeoutError:
        raise RaydistillError(f"the server at {url} did not answer within {TIMEOUT_S:.0f} s; "
                              "is it overloaded? try a smaller --max-tokens") from None
    except openai.APIConnectionError:
        raise RaydistillError(f"no server at {url}; start one with "
                              f"`{command_name()} serve RUN_DIR` (or pass --url)") from None
    except openai.APIStatusError as e:
        raise RaydistillError(_status_message(e, url)) from None
    except openai.APIError as e:  # an error event inside a stream
        raise RaydistillError(f"the server at {url} failed: {_server_message(e)}") from None
    return 0


def _first_model(client, url: str) -> str:
    models = client.models.list().data
    if not models:
        raise RaydistillError(f"the server at {url} hosts no models")
    return models[0].id


def _status_message(e, url: str) -> str:
    text = f"the server at {url} answered {e.status_code}: {_server_message(e)}"
    if e.status_code == 401:
        text += f" (pass --api-key or set ${API_KEY_ENV})"
    elif e.status_code == 404 and not _has_error_body(e):  # Serve's proxy, before the app is up
        text += (" — if `raydistill serve` is still starting, wait for its \"serving N model(s)\" "
                 "line; otherwise check --url names a raydistill server")
    return text


def _has_error_body(e) -> bool:
    """The answer carries an OpenAI error body (raydistill's routes always send one)."""
    body = getattr(e, "body", None)
    return isinstance(body, dict) and bool(body.get("error", body))


def _server_message(e) -> str:
    """The `message` of OpenAI's error body (the client may hand over the body or its `error`)."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", e))
