"""Student rollout engines for on-policy distillation: the student samples continuations of
prompts with the trainers' current weights, which the teacher actors then score.

`RolloutWorker` is the plain class (unit tests use it without Ray): a vLLM engine of the student
(`backend="vllm"`) or a transformers fallback (`"hf"`), `actors.rollout_engines`. `RolloutActor`
is its Ray shell, created by the driver as
`RolloutActor.options(num_cpus=..., num_gpus=...).remote(spec)`; each `generate` call names the
weights version it wants and carries the state dict's ObjectRef, so an actor whose weights are
older — or a restarted one, which starts with none — fetches and loads them itself first.

Restart policy: Ray restarts a dead rollout actor (process killed, node lost, engine crash) up to
MAX_RESTARTS times and resubmits the call it was running up to MAX_TASK_RETRIES times; a call is
safe to repeat (its seeds fix its samples, and it reloads the weights it names). The bound is
there so that an engine that dies at every start (out of memory, a broken device) ends in a
RayActorError for the driver to act on, not in an endless restart loop; the driver may replace
such an actor with a fresh one, which has its own restart budget.

Errors cross Ray intact (`orchestrator.errors.remote_errors`), as for the teacher actors
(actors/pool.py): the driver sees the original type and text.
"""

from __future__ import annotations

import os
import time

import ray
import torch

from actors.engine_process import engine_core_in_this_process
from orchestrator.errors import ConfigError, DataError, RaydistillError, remote_errors
from orchestrator.train.specs import RolloutEngineSpec


class RolloutWorker:
    """One student engine. `version`: the weights version loaded; -1 = none loaded yet (the
    engine's own weights, random when the model dir has none)."""

    def __init__(self, spec: RolloutEngineSpec):
        from actors.rollout_engines import HFRolloutEngine, VLLMRolloutEngine

        if spec.backend not in ("vllm", "hf"):
            raise ConfigError(f"the rollout backend must be vllm or hf, got {spec.backend!r}")
        positions = _max_positions(spec.model_dir)
        if positions is not None and spec.max_model_len > positions:
            raise ConfigError(
                f"the rollout engine's max_model_len ({spec.max_model_len}) is longer than "
                f"{spec.model_dir} has positions ({positions}); lower it to at most {positions}")
        self.spec = spec
        self.version = -1
        engine = VLLMRolloutEngine if spec.backend == "vllm" else HFRolloutEngine
        self.engine = engine(spec)

    def ready(self) -> dict:
        return {"backend": self.spec.backend, "pid": os.getpid(),
                "vocab_size": self.engine.vocab_size, "max_length": self.engine.max_length}

    def load_weights(self, version: int, state: dict[str, torch.Tensor]) -> float:
        """Load a full HF-named state dict (the transformers student's `model.state_dict()`; a
        tied lm_head may be absent) into the engine in place, without restarting it; returns
        the seconds taken. Afterwards `self.version == version`."""
        start = time.perf_counter()
        self.version = -1  # a load that fails half-way leaves no version claimed
        self.engine.load(state)
        self.version = version
        return time.perf_counter() - start

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 seeds: list[int], stop_ids: list[int]) -> dict:
        """One sampled continuation per prompt: its token ids without the prompt, ending at a
        stop id (kept) or after max_new_tokens. temperature 0: greedy. Returns
        {"completions": list[list[int]], "version": int, "generate_s": float}."""
        self._check(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                    seeds=seeds, stop_ids=stop_ids)
        start = time.perf_counter()
        completions = self.engine.generate(prompts, max_new_tokens=max_new_tokens,
                                           temperature=float(temperature),
                                           seeds=[int(s) for s in seeds],
                                           stop_ids=[int(s) for s in stop_ids])
        return {"completions": completions, "version": self.version,
                "generate_s": time.perf_counter() - start}

    def _check(self, prompts, *, max_new_tokens, temperature, seeds, stop_ids) -> None:
        if len(seeds) != len(prompts):
            raise RaydistillError(f"generate needs one seed per prompt: got {len(seeds)} seeds "
                                  f"for {len(prompts)} prompts")
        if max_new_tokens < 1:
            raise ConfigError(f"on_policy.max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise ConfigError(f"on_policy.temperature must be ≥ 0 (0: greedy), got {temperature}")
        vocab, limit = self.engine.vocab_size, self.engine.max_length
        outside = [s for s in stop_ids if not 0 <= s < vocab]
        if outside:
            raise ConfigError(f"rollout stop ids {outside} are outside the student's vocabulary "
                              f"[0, {vocab}); pass the tokenizer's own ids (EOS, end of turn)")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise DataError(f"rollout prompt {i} is empty; every prompt needs a token")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise DataError(f"rollout prompt {i} holds token ids outside the student's "
                                f"vocabulary [0, {vocab}): {min(prompt)}..{max(prompt)}")
            if len(prompt) + max_new_tokens > limit:
                raise ConfigError(
                    f"rollout prompt {i} has {len(prompt)} tokens, and with on_policy."
                    f"max_new_tokens={max_new_tokens} it needs {len(prompt) + max_new_tokens} "
                    f"positions, more than the rollout engine's max_model_len ({limit}); "
                    "shorten the prompts or lower on_policy.max_new_tokens")

    def close(self) -> None:
        self.engine.close()


def _max_positions(model_dir: str) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    return getattr(config, "max_position_embeddings", None)


class _Rollout:
    """The rollout actor's body: a RolloutWorker whose errors cross Ray intact (RemoteError)."""

    def __init__(self, spec: RolloutEngineSpec):
        engine_core_in_this_process()
        self.worker, self.start_error = None, None
        try:
            with remote_errors("rollout.start"):
                self.worker = RolloutWorker(spec)
        except RaydistillError as e:  # kept for ready(): a failed creation loses the exception
            self.start_error = e

    def _started(self) -> RolloutWorker:
        if self.start_error is not None:
            raise self.start_error
        return self.worker

    def ready(self) -> dict:
        with remote_errors("rollout.ready"):
            return self._started().ready()

    def generate(self, prompts: list[list[int]], *, version: int, weights: list | None,
                 **kw) -> dict:
        """`RolloutWorker.generate` with the weights of `version`: when the engine holds another
        version, `ray.get(weights[0])` (the state dict's ObjectRef, inside a list so that Ray
        does not fetch it for every call) and load it first. Adds "load_s" (fetch + load
        seconds, 0.0 when nothing was loaded) and "fetch_s" to the result."""
        with remote_errors("rollout.generate"):
            worker = self._started()
            load_s = fetch_s = 0.0
            if version != worker.version:
                if not weights:
                    raise RaydistillError(
                        f"the rollout engine holds weights version {worker.version}, the call "
                        f"asks for {version} but sends no weights: pass weights=[ref]")
                start = time.perf_counter()
                state = ray.get(weights[0])
                fetch_s = time.perf_counter() - start
                worker.load_weights(version, state)
                del state
                load_s = time.perf_counter() - start
            result = worker.generate(prompts, **kw)
            result.update(load_s=load_s, fetch_s=fetch_s)
            return result

    def close(self) -> None:
        if self.worker is not None:
            with remote_errors("rollout.close"):
                self.worker.close()


MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
RolloutActor = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)(_Rollout)
