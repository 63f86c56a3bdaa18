"""The Ray Serve application: a run's winning students behind OpenAI-compatible HTTP routes
(`/v1/completions`, `/v1/chat/completions`).

    raydistill serve RUN_DIR        # serve/app.py: run_server
    raydistill query "def f("       # serve/client.py: query

Public: `run_server`, `build_app`, `start`, `stop` (serve.app) and `query` (serve.client).
Modules: app (start/stop, the CLI entry), openai_api (the deployment: routes, multiplexing,
batching), replica (a replica's jobs, counters and merged streams), admission (per-replica limits
and the 429), protocol (OpenAI wire format), generate (the batched decode loop, pure torch),
chat (a student's chat template: the prompt of a conversation and its end-of-turn token), client
(the `openai`-based command-line client). Importing this package imports nothing heavy.
"""

__all__ = ["build_app", "query", "run_server", "start", "stop"]


def __getattr__(name: str):
    if name in ("build_app", "run_server", "start", "stop"):
        from serve import app

        return getattr(app, name)
    if name == "query":
        from serve.client import query

        return query
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
