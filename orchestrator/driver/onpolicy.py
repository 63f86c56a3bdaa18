"""The actors of an on-policy student run (driver-internal, used by `students`): student rollout
actors (`actors.rollout`) and teacher actors that score their samples (`actors.pool`'s teacher with
`score_rollouts`), started as the run starts (without holding it up) and stopped by handle after
it.

Both restart by themselves (Ray's max_restarts / max_task_retries): a killed actor is replaced and
its unfinished request runs again, so the training step it feeds completes. A replaced rollout
actor starts with no trained weights and loads the current ones from the object-store reference
the next request carries (`orchestrator.train.onpolicy`).

The rollout engines start from a model directory holding only the student's config and the
teacher's tokenizer (`rollout_model_dir`); the trainers send every weight.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

from orchestrator.config import Config
from orchestrator.console import say
from orchestrator.errors import ConfigError
from orchestrator.shards.plan import CapturePlan
from orchestrator.train.specs import OnPolicySpec

RESTARTS = 3
"""Restarts of one rollout or scoring actor (and retries of its task) before the run fails."""


class OnPolicyActors:
    """`with OnPolicyActors(cfg, plan, storage=...) as actors: spec = actors.spec()`.

    The actors start in the background: the student trains on the offline shards meanwhile (a
    streaming run's student reads them as the teachers write them) and its first on-policy step
    waits for them. An actor that fails to start fails that step; leaving the context then raises
    the start's own error (what failed and why) instead of the training error it caused."""

    def __init__(self, cfg: Config, plan: CapturePlan, *, storage: str, label: str = "kd"):
        self.cfg, self.plan, self.storage, self.label = cfg, plan, storage, label
        self.rollouts: list = []
        self.scorers: list = []
        self._tmp = None
        self._waiter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._stopping = False

    def __enter__(self) -> OnPolicyActors:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self._waiter is not None:
            self._waiter.join(timeout=30)  # a dead actor's ready() answers at once
        failed = self._start_error
        self._stop()
        if failed is not None and exc is not None and not isinstance(exc, KeyboardInterrupt):
            raise failed from None

    def _start(self) -> None:
        from actors.pool import TeacherActor, wait_started
        from actors.rollout import RolloutActor
        from orchestrator.train.specs import RolloutEngineSpec

        o, t = self.cfg.on_policy, self.cfg.teacher
        if self.plan.max_length - o.max_new_tokens < 1:
            raise ConfigError(
                f"on_policy.max_new_tokens {o.max_new_tokens} leaves no room for a prompt in the "
                f"capture's {self.plan.max_length}-token samples; lower on_policy.max_new_tokens "
                "or raise data.max_length")
        model_dir = self._model_dir()
        engine = RolloutEngineSpec(model_dir=model_dir, backend=o.backend,
                                   max_model_len=self.plan.max_length, seed=self.cfg.train.seed,
                                   kv_cache_gib=o.kv_cache_gib)
        say(f"on-policy: starting {o.rollout_actors} {o.backend} student rollout actor(s) and "
            f"{o.teacher_actors} {t.backend} teacher actor(s) to score their samples")
        t0 = time.time()
        restarts = {"max_restarts": RESTARTS, "max_task_retries": RESTARTS}
        self.rollouts = [RolloutActor.options(num_cpus=o.rollout_cpus, num_gpus=o.rollout_gpus,
                                              **restarts).remote(engine)
                         for _ in range(o.rollout_actors)]
        self.scorers = [TeacherActor.options(num_cpus=o.teacher_cpus, num_gpus=t.num_gpus,
                                             **restarts).remote(self.plan.engine_spec())
                        for _ in range(o.teacher_actors)]
        ready = [a.ready.remote() for a in self.rollouts + self.scorers]

        def wait() -> None:
            try:
                wait_started(ready)
            except BaseException as e:  # noqa: BLE001 — raised by __exit__
                if not self._stopping:
                    self._start_error = e
                return
            if not self._stopping:
                say(f"on-policy actors ready in {time.time() - t0:.0f}s")

        self._waiter = threading.Thread(target=wait, name="on-policy-start", daemon=True)
        self._waiter.start()

    def _model_dir(self) -> str:
        """The student's config and the teacher's tokenizer, for the rollout engines to start
        from (beside the run when output_dir is local, else in a local temporary folder)."""
        from transformers import AutoConfig

        from orchestrator.driver.specs import student_shape
        from orchestrator.kd.student import student_config
        from orchestrator.teacher_info import load_tokenizer

        s, t = self.cfg.student, self.cfg.teacher
        if "://" in self.storage:
            self._tmp = tempfile.mkdtemp(prefix="raydistill-rollout-")
            path = self._tmp
        else:
            path = os.path.join(self.storage, f"{self.label}-rollout-model")
        os.makedirs(path, exist_ok=True)
        if s.model:
            config = AutoConfig.from_pretrained(s.model, revision=s.revision)
        else:
            config = student_config(AutoConfig.from_pretrained(t.model), student_shape(self.cfg))
        config.save_pretrained(path)
        load_tokenizer(t.model, revision=t.revision).save_pretrained(path)
        return path

    def spec(self) -> OnPolicySpec:
        """The run's `OnPolicySpec`: the settings, the actors' handles, the stop tokens."""
        from orchestrator import chat
        from orchestrator.kd.losses import LossSpec
        from orchestrator.teacher_info import load_tokenizer

        o, tr, t = self.cfg.on_policy, self.cfg.train, self.cfg.teacher
        tokenizer = load_tokenizer(t.model, revision=t.revision)
        stops = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
        if self.plan.chat_template:
            stops = sorted(set(stops) | set(chat.stop_ids(tokenizer, self.plan.chat_template)))
        return OnPolicySpec(
            share=tr.on_policy,
            loss=LossSpec(kind=o.loss, temperature=1.0, alpha=1.0, beta=o.beta, tail=tr.tail),
            rollout_actors=tuple(self.rollouts), teacher_actors=tuple(self.scorers), k=t.k,
            stop_ids=tuple(stops), max_length=self.plan.max_length,
            max_new_tokens=o.max_new_tokens, temperature=o.temperature,
            prompts=tr.on_policy_prompts, prompt_tokens=o.prompt_tokens,
            sync_every=o.sync_every, max_staleness=o.max_staleness, start_step=o.start_step)

    def _stop(self) -> None:
        import shutil

        import ray

        self._stopping = True
        closing = [a.close.remote() for a in self.rollouts + self.scorers]
        try:
            ray.get(closing, timeout=30)
        except Exception:  # noqa: BLE001 — a dead actor cannot close; it is killed below
            pass
        for a in self.rollouts + self.scorers:
            ray.kill(a, no_restart=True)
        self.rollouts, self.scorers = [], []
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
