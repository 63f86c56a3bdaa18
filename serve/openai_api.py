"""The Ray Serve deployment behind the OpenAI-compatible routes: one FastAPI ingress that hosts
several students (model multiplexing) and decodes requests for the same student together
(request batching). Built and started by serve/app.py (`raydistill serve RUN_DIR`).

Routes: `GET /health` (open), `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (the key, when one is set, is checked before any model work). A chat
request is rendered with the student's own chat template (serve/chat.py: a 400 for a student
without one) and decodes until the template's end-of-turn token or eos; it then goes through the
same admission, batching and streaming as a completion. Every error has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.

Design:
- Multiplexing: `serve.multiplexed(max_num_models_per_replica=models_per_replica)` wraps the
  loader, so a replica keeps its most recently used students and evicts the least recently used.
  The student is chosen by the body's `model` field; a request that also carries the header
  `serve_multiplexed_model_id: <id>` (our client sends it) is routed by the proxy to a replica that
  already holds that student, which matters once max_replicas > 1. Without the header any replica
  serves it, loading the student on first use.
- Batching: one `@serve.batch` queue per student, built at first use from the deployment's
  settings (max_batch_size, batch_wait_timeout_s), so requests for different students never share
  a batch. The batched function is an async generator: each step it yields one entry per request
  (a `generate.Delta`, or StopIteration once that request has ended), which Ray Serve fans out to
  the callers. Streamed and non-streamed requests share the queues (a non-streamed request just
  joins its deltas), so both are batched. A batch is fixed once it starts (no continuous
  batching), and Ray forms the next batch as soon as the previous one is dispatched, from what
  arrives within batch_wait_timeout_s; under load batches are therefore often smaller than
  max_batch_size (BENCHMARKS.md, "Serving").
- Compute: every decode step and every model load runs on one worker thread per replica, so the
  event loop stays free to accept requests (and fill the next batch) while torch works;
  torch uses int(replica_cpus) threads (at least 1).
- Admission (serve/admission.py): a replica works on (loads, batches, decodes) at most
  serve.max_ongoing_requests completions at once and holds at most serve.max_queued_requests more
  waiting for a slot; a completion beyond that is answered at once with 429, a `Retry-After`
  header and an OpenAI error body, before its body is parsed or any model is touched. Capacity is
  therefore replicas × (max_ongoing_requests + max_queued_requests). Ray Serve's own limits are
  set above ours (`bind`: SERVE_HEADROOM more per replica, a SERVE_QUEUE-deep queue in front) so
  that overflow meets this cheap 429 and never Serve's 503; Serve's own rejection is set to 429
  with Retry-After as well, as a last resort (its body is plain text) for floods beyond that.
- Replica loss: Serve health-checks replicas every HEALTH_CHECK_PERIOD_S and replaces a dead one;
  requests not yet accepted by the dead replica are routed to a live one, but the requests it was
  working on are lost: Ray Serve's proxy answers them 500 (or cuts an open stream). See
  BENCHMARKS.md, "Serving under load (issue 5)".
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from orchestrator.config import ServeConfig
from orchestrator.winners import ServedModel
from serve import chat, protocol
from serve.admission import RETRY_AFTER_S, Admission, Ticket
from serve.generate import Delta, Sampling, Student, decode_batch, encode_prompt, load_student
from serve.replica import Job, Stats, merged
from serve.protocol import ApiError

log = logging.getLogger("ray.serve")
DEPLOYMENT = "StudentServer"
SERVE_HEADROOM = 1024
"""Requests a replica takes from Ray Serve beyond its own admission limit, to answer them 429."""
SERVE_QUEUE = 4096
"""Requests Ray Serve's router queues in front of full replicas (its max_queued_requests)."""
HEALTH_CHECK_PERIOD_S = 2.0
"""How often Serve checks that a replica lives (its default, 10 s, leaves a dead one longer)."""

api = FastAPI(title="raydistill", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = {401: {"WWW-Authenticate": "Bearer"},
               429: {"Retry-After": str(RETRY_AFTER_S)}}.get(exc.status)
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404:
        message += ("; routes are GET /health, GET /v1/models, POST /v1/completions, "
                    "POST /v1/chat/completions")
    return JSONResponse(protocol.error_body(message, code=str(exc.status_code)),
                        status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    return JSONResponse(protocol.error_body(f"{'.'.join(map(str, first['loc']))}: {first['msg']}"),
                        status_code=400)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class StudentServer:
    """A replica: the multiplexed students, their batch queues and the decode thread."""

    def __init__(self, models: list[ServedModel], settings: ServeConfig,
                 api_key: str | None = None):
        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._models = {m.id: m for m in models}
        self._settings = settings
        self._api_key = api_key or None
        self._threads = max(1, int(settings.replica_cpus))
        torch.set_num_threads(self._threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydistill-decode")
        self._batchers: dict[str, object] = {}
        self._stats = Stats()
        self._admission = Admission(working=settings.max_ongoing_requests,
                                     waiting=settings.max_queued_requests)
        self._created = int(time.time())

        async def load_student_by_id(model_id: str) -> Student:
            path = self._models[model_id].path
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, lambda: load_student(
                path, threads=self._threads))

        self._load_fn = load_student_by_id
        self._student = serve.multiplexed(
            max_num_models_per_replica=settings.models_per_replica)(load_student_by_id)

    # ------------------------------------------------------------------------------------------
    # Routes
    # ------------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": list(self._models), "loaded": self._loaded(),
                "replica": serve.get_replica_context().replica_tag, "pid": os.getpid(),
                "stats": self._stats.as_dict() | self._admission.as_dict()}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list",
                "data": [{"id": m.id, "object": "model", "created": self._created,
                          "owned_by": "raydistill", "rank": m.rank, "metrics": m.metrics}
                         for m in self._models.values()]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._admitted(request, self._complete)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._admitted(request, self._chat)

    async def _admitted(self, request: Request, handle):
        self._authorize(request)
        ticket = self._admission.admit()  # 429 at once when full: nothing parsed, no model work
        try:
            response = await handle(await request.body(), ticket)
        except BaseException:
            ticket.release()
            raise
        if not isinstance(response, StreamingResponse):  # a stream releases it when it ends
            ticket.release()
        return response

    async def _complete(self, body: bytes, ticket: Ticket):
        req = protocol.parse_completion_request(body)
        student = await self._find_student(req.model, ticket)
        jobs = [self._job(req, student, encode_prompt(student, prompt), seed=req.seed)
                for prompt in req.prompts()]
        events = protocol.Events(protocol.new_completion_id(), req.model, int(time.time()),
                                 chat=False, include_usage=protocol.include_usage(req))
        prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
        if req.stream:
            return self._streaming(jobs, events, prompt_tokens, ticket)
        results = await self._results(jobs)
        choices = [protocol.choice(i, text, reason) for i, (text, reason, _) in enumerate(results)]
        return protocol.completion(events.cid, req.model, choices, created=events.created,
                                   prompt_tokens=prompt_tokens,
                                   completion_tokens=sum(n for _, _, n in results))

    async def _chat(self, body: bytes, ticket: Ticket):
        req = protocol.parse_chat_request(body)
        student = await self._find_student(req.model, ticket)
        ids = self._chat_prompt(req, student)
        jobs = [self._job(req, student, ids, seed=req.choice_seed(i),
                          stop_ids=student.end_of_turn_ids) for i in range(req.n)]
        events = protocol.Events(protocol.new_completion_id(chat=True), req.model,
                                 int(time.time()), chat=True,
                                 include_usage=protocol.include_usage(req))
        if req.stream:
            return self._streaming(jobs, events, len(ids), ticket)
        results = await self._results(jobs)
        return protocol.chat_completion(events.cid, req.model, [r[:2] for r in results],
                                        created=events.created, prompt_tokens=len(ids),
                                        completion_tokens=sum(n for _, _, n in results))

    def _streaming(self, jobs: list[Job], events: protocol.Events, prompt_tokens: int,
                   ticket: Ticket) -> StreamingResponse:
        self._stats.requests += 1
        self._stats.prompts += len(jobs)
        # The stream's own `finally` releases the ticket; the background task is the backstop
        # for a stream that never starts (the client left before the headers went out).
        return StreamingResponse(self._stream(jobs, events, prompt_tokens, ticket),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(ticket.release))

    async def _results(self, jobs: list[Job]) -> list[tuple[str, str, int]]:
        self._stats.requests += 1
        self._stats.prompts += len(jobs)
        try:
            return await asyncio.gather(*(self._collect(job) for job in jobs))
        except Exception as e:  # noqa: BLE001 - any decode failure is the client's 500
            raise self._internal(e) from None

    # ------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self._api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: "
                                f"Bearer <key>` with the key the server read from "
                                f"${self._settings.api_key_env}", code="invalid_api_key",
                           kind="authentication_error")

    async def _find_student(self, model_id: str, ticket: Ticket) -> Student:
        """The loaded student, once the request holds a working slot (loading is model work)."""
        if model_id not in self._models:
            raise ApiError(404, f"model {model_id!r} does not exist; this server hosts "
                                f"{', '.join(self._models)}", param="model",
                           code="model_not_found")
        await ticket.slot()
        try:
            return await self._student(model_id)
        except Exception as e:  # noqa: BLE001
            raise self._internal(e, what=f"loading model {model_id!r}") from None

    def _chat_prompt(self, req: protocol.ChatRequest, student: Student) -> list[int]:
        """The messages rendered with the student's chat template, as prompt ids."""
        if not chat.has_chat_template(student.tokenizer):
            raise ApiError(400, f"model {req.model!r} has no chat template (its tokenizer declares "
                                "no chat_template), so it cannot take messages; send the text "
                                "as a prompt to POST /v1/completions instead", param="model",
                           code="chat_template_missing")
        try:
            return chat.render(student.tokenizer, req.conversation())
        except chat.TemplateRefused as e:
            raise ApiError(400, f"{req.model}'s chat template refused these messages ({e}); "
                                "send a conversation it accepts", param="messages") from None

    def _job(self, req: protocol.CompletionRequest | protocol.ChatRequest, student: Student,
             ids: list[int], *, seed: int | None, stop_ids: frozenset[int] = frozenset()) -> Job:
        """A validated job: the prompt fits serve.max_prompt_tokens and, with the completion's
        token limit, the model's context (a chat request without one gets what is left)."""
        s = self._settings
        max_tokens, param = req.token_limit()
        what, where = ("prompt", "prompt") if isinstance(req, protocol.CompletionRequest) else (
            f"the chat prompt (the messages in {req.model}'s chat template)", "messages")
        if max_tokens is not None and max_tokens > s.max_tokens:
            raise ApiError(400, f"{param}={max_tokens} is above this server's limit of "
                                f"{s.max_tokens} (serve.max_tokens)", param=param,
                           code="max_tokens_too_large")
        limit = min(s.max_prompt_tokens, student.context - 1)
        if not ids:
            raise ApiError(400, f"{what} is empty (0 tokens); send some text", param=where)
        if len(ids) > limit:
            raise ApiError(400, f"{what} is {len(ids)} tokens; the limit is {limit} tokens "
                                f"(serve.max_prompt_tokens={s.max_prompt_tokens}, {req.model}'s "
                                f"context {student.context} - 1)", param=where,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(s.max_tokens, student.context - len(ids))
        elif len(ids) + max_tokens > student.context:
            raise ApiError(400, f"{what} ({len(ids)} tokens) + {param} ({max_tokens}) = "
                                f"{len(ids) + max_tokens} is more than {req.model}'s context "
                                f"of {student.context} tokens; ask for at most {param}="
                                f"{student.context - len(ids)}", param=param,
                           code="context_length_exceeded")
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            seed=seed, stop=req.stops(), stop_ids=stop_ids)
        return Job(model_id=req.model, student=student, prompt_ids=ids, sampling=sampling)

    def _internal(self, e: Exception, *, what: str = "decoding") -> ApiError:
        self._stats.errors += 1
        log.exception("raydistill: %s failed", what)
        return ApiError(500, f"{what} failed on the server: {type(e).__name__}: {e}",
                        kind="server_error", code="internal_error")

    # ------------------------------------------------------------------------------------------
    # Batching and decoding
    # ------------------------------------------------------------------------------------------

    def _batcher(self, model_id: str):
        """The student's `@serve.batch` queue: call it with one Job, iterate its deltas."""
        fn = self._batchers.get(model_id)
        if fn is None:
            async def decode_together(jobs: list[Job]):
                async for step in self._decode(jobs):
                    yield step

            fn = serve.batch(max_batch_size=self._settings.max_batch_size,
                             batch_wait_timeout_s=self._settings.batch_wait_timeout_s)(
                decode_together)
            self._batchers[model_id] = fn
        return fn

    async def _decode(self, jobs: list[Job]):
        """One batch: per step one entry per job (a Delta, or StopIteration once it ended)."""
        loop = asyncio.get_running_loop()
        self._stats.batch(len(jobs))
        steps = decode_batch(jobs[0].student, [j.prompt_ids for j in jobs],
                             [j.sampling for j in jobs])
        while True:
            out = await loop.run_in_executor(self._pool, next, steps, None)
            if out is None:
                return
            for d in out:
                if d is not None and d.finish_reason:
                    self._stats.completion_tokens += d.tokens
            yield [StopIteration if d is None else d for d in out]

    async def _deltas(self, job: Job) -> AsyncIterator[Delta]:
        # Read to the end (the StopIteration one step after the last delta): leaving early
        # would leave Ray Serve's next future unread ("Future exception was never retrieved").
        async for delta in self._batcher(job.model_id)(job):
            yield delta

    async def _collect(self, job: Job) -> tuple[str, str, int]:
        parts, last = [], None
        async for last in self._deltas(job):
            parts.append(last.text)
        if last is None:
            raise RuntimeError("the batch ended without producing any token")
        return "".join(parts), last.finish_reason, last.tokens

    async def _stream(self, jobs: list[Job], events: protocol.Events, prompt_tokens: int,
                      ticket: Ticket) -> AsyncIterator[str]:
        """Server-sent events (protocol.Events): the opening chunks, the deltas as they come,
        then usage (if asked) and [DONE]."""
        tokens = 0
        try:
            for event in events.start(len(jobs)):
                yield event
            async for index, d in merged([self._deltas(j) for j in jobs]):
                for event in events.delta(index, d.text, d.finish_reason):
                    yield event
                if d.finish_reason:
                    tokens += d.tokens
        except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
            yield protocol.sse(self._internal(e).body())
            return
        finally:
            ticket.release()
        if events.include_usage:
            yield events.usage(prompt_tokens, tokens)
        yield protocol.DONE

    def _loaded(self) -> list[str]:
        # Hack: Ray Serve keeps the loaded models in a private attribute of the multiplexed
        # function (no public API lists them); /health only reports it, so a rename costs nothing.
        wrapper = getattr(self._load_fn, "__serve_multiplex_wrapper", None)
        return list(getattr(wrapper, "models", {}) or {})


def bind(models: list[ServedModel], settings: ServeConfig, *, api_key: str | None = None):
    """The application: the deployment with the settings' replicas and CPUs. Each replica
    enforces the settings' queue limits itself (serve/admission.py); Ray Serve's own limits stand
    above them, so that Serve's rejection is not reached first (module docstring, "Admission")."""
    from ray.serve.config import BackpressureConfig

    autoscaling = {"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
                   "target_ongoing_requests": settings.target_ongoing_requests}
    unbounded = settings.max_queued_requests < 0
    admitted = settings.max_ongoing_requests + max(0, settings.max_queued_requests)
    return StudentServer.options(
        autoscaling_config=autoscaling, max_ongoing_requests=admitted + SERVE_HEADROOM,
        max_queued_requests=-1 if unbounded else SERVE_QUEUE,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options={"num_cpus": settings.replica_cpus},
    ).bind(list(models), settings, api_key)
