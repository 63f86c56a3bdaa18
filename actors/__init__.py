"""Teacher backends behind one Protocol (`actors.backend.TeacherBackend`): `actors.vllm_backend`
(real vLLM engine) and `actors.hf_backend` (transformers reference); `actors.teacher.TeacherWorker`
(plain class: one work unit → one shard) and `actors.pool.TeacherPool` (its Ray actors and the
work queue); `actors.rollout.RolloutWorker` (plain class: the student's rollout engine for
on-policy distillation) and `actors.rollout.RolloutActor` (its Ray shell). Heavy imports (vllm,
ray) happen only in the modules that need them."""
