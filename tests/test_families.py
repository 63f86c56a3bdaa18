"""The family matrix (docs/models.md): for each model family, a tiny random teacher with its own BPE
tokenizer is captured by the hf and the vLLM backends (which must agree), students built from
scratch and from the teacher train a few real Ray Train steps on a real capture, the saved students
load in transformers and in vLLM, and one Ray Serve application serves a student of every family.

    PYTHONPATH=$PWD python -m pytest -q tests/test_families.py        # 10 min on 2 CPUs

Everything per family is built once (`Matrix` memoises it), whatever order the tests run in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.driver import tiny
from tests.conftest import agree, capture_config, capture_folder, serve_settings, write_jsonl

FAMILIES = tiny.FAMILIES
K = 8
ATOL = 2e-3  # as tests/actors/test_backends.py: fp32 engine vs fp32 transformers
# Every family, Gemma 2 (final_logit_softcapping) included, is captured through the hidden-state
# fast path, which applies the model's whole head (bias, soft cap, scale) and self-checks it
# against vLLM's own head at engine start (actors/vllm_backend.py).
SCORING = {family: "hidden" for family in FAMILIES}
# Released checkpoints pad their embedding tables past the tokenizer (Qwen2, Gemma): two families
# do here too, so nothing may compare vocab_size with the tokenizer's length.
PADDED_ROWS = {"qwen2": 40, "gemma3_text": 24}


class Matrix:
    """Builds and remembers, per family: the teacher, its capture, the trained students."""

    def __init__(self, root, texts):
        self.root, self.texts = root, texts
        self._teachers: dict[str, str] = {}
        self._captures: dict[str, dict] = {}
        self._students: dict[tuple[str, bool], str] = {}

    def teacher(self, family: str) -> str:
        """A 3-layer, 128-wide teacher (head_dim 64, GQA where the family has it), LM head
        sharpened like conftest's tiny_teacher; its own 512-token BPE."""
        if family not in self._teachers:
            out = self.root / family / "teacher"
            start = 7 * FAMILIES.index(family)  # each family's tokenizer from other modules
            texts = list(tiny.chunks_of_text(tiny.stdlib_sources()[start:start + 20]))
            tok = tiny.train_tokenizer(texts, out, vocab_size=512)
            cfg = tiny.family_config(family, len(tok) + PADDED_ROWS.get(family, 0), layers=3,
                                     max_positions=256)
            model = tiny.build_model(cfg, seed=0)
            tiny.sharpen(model, scale=6.0)
            model.save_pretrained(str(out), safe_serialization=True)
            self._teachers[family] = str(out)
        return self._teachers[family]

    def capture(self, family: str) -> dict:
        """A real capture (pipeline.capture, hf backend in a Ray actor) of 24 texts, 3 shards."""
        if family not in self._captures:
            from orchestrator.driver.pipeline import capture

            root = self.root / family / "capture"
            root.mkdir(parents=True, exist_ok=True)
            data = write_jsonl(root / "data.jsonl",
                               [{"id": i, "text": t} for i, t in enumerate(self.texts[:24])])
            cfg = capture_config(root, self.teacher(family), data)
            manifest = capture(cfg)
            self._captures[family] = {"out": str(capture_folder(cfg.output_dir)),
                                      "units": manifest.total_units}
        return self._captures[family]

    def student(self, family: str, *, init: bool) -> str:
        """A 1-layer, 128-wide student trained 4 steps by Ray Train (local mode) on the capture;
        returns its exported Hugging Face directory."""
        if (family, init) not in self._students:
            from orchestrator.kd.losses import LossSpec
            from orchestrator.shapes import resolve_shape
            from orchestrator.teacher_info import inspect_teacher
            from orchestrator.train.launch import fit_student
            from orchestrator.train.specs import (DataSpec, EvalSpec, OptimSpec, RunSpec,
                                                  StudentSpec, TrainSpec)

            teacher, cap = self.teacher(family), self.capture(family)
            fingerprint = inspect_teacher(teacher).tokenizer_fingerprint
            spec = TrainSpec(
                student=StudentSpec(teacher_model=teacher, shape=resolve_shape(preset="nano"),
                                    init_from_teacher=init),
                data=DataSpec(shards_uri=cap["out"], units=list(range(cap["units"])),
                              streaming=False, expect={"tokenizer_fingerprint": fingerprint}),
                loss=LossSpec(kind="fkl", temperature=1.0, alpha=0.5, beta=0.5,
                              tail="renormalize"),
                optim=OptimSpec(lr=2e-3, warmup_steps=1, batch_size=4, grad_accum=1,
                                max_steps=4, seed=3),
                eval=EvalSpec(every=4, heldout_uri=None, samples=0),
                run=RunSpec(log_every=2, label="init" if init else "scratch"))
            result = fit_student(spec, storage=str(self.root / family / "experiments"),
                                 name=spec.run.label, num_workers=0, use_gpu=False,
                                 cpus_per_worker=1, max_failures=0)
            assert result.final["step"] == 4 and np.isfinite(result.final["loss"])
            self._students[(family, init)] = result.model_dir
        return self._students[(family, init)]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, texts, ray_session):
    return Matrix(tmp_path_factory.mktemp("families"), texts)


def _sequences(teacher: str, texts: list[str]) -> list[list[int]]:
    """Four real token sequences of 60–100 tokens: longer than the sliding window (32)."""
    from orchestrator.teacher_info import load_tokenizer

    tok = load_tokenizer(teacher)
    seqs = [tok(t)["input_ids"][:100] for t in texts[30:60]]
    return [s for s in seqs if len(s) >= 60][:4]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_vllm_agrees_with_hf(matrix, texts, family):
    from actors.hf_backend import HFBackend
    from actors.vllm_backend import VLLMBackend
    from orchestrator.teacher_info import inspect_teacher, load_tokenizer

    teacher = matrix.teacher(family)
    info = inspect_teacher(teacher)
    assert info.vocab_size == len(load_tokenizer(teacher)) + PADDED_ROWS.get(family, 0)
    seqs = _sequences(teacher, texts)
    ref = HFBackend(teacher, dtype="float32").score(seqs, k=K)
    engine = VLLMBackend(teacher, mode="score", k=K, dtype="float32", scoring=SCORING[family],
                         max_model_len=256, kv_cache_gib=0.25)
    try:
        assert engine.vocab_size == info.vocab_size
        for got, want in zip(engine.score(seqs, k=K), ref):
            agree(got, want, atol=ATOL)
            np.testing.assert_allclose(got.target_logprobs, want.target_logprobs, atol=ATOL)
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("init", [False, True], ids=["scratch", "init"])
@pytest.mark.parametrize("family", FAMILIES)
def test_student_trains_saves_and_reloads(matrix, family, init):
    """The exported student loads in transformers and its config rebuilds the very model the
    trainer built (same per-layer attention: logits equal past the sliding window)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.kd.student import build_student
    from orchestrator.shapes import resolve_shape

    path = matrix.student(family, init=init)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = loaded.config
    assert cfg.num_hidden_layers == 1 and len(getattr(cfg, "layer_types", [None])) == 1
    teacher = matrix.teacher(family)
    source = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32) if init else None
    built, _ = build_student(AutoConfig.from_pretrained(teacher), resolve_shape(preset="nano"),
                             init_from_teacher=source, seed=3)  # as the trainer built it
    weights = load_file(f"{path}/model.safetensors")
    initial = {k: v.clone() for k, v in built.state_dict().items()}
    built.load_state_dict(weights, strict=False)  # tied heads are stored once
    assert any(not torch.equal(initial[k], v) for k, v in weights.items())  # it trained
    x = torch.randint(4, 500, (2, 80))
    with torch.no_grad():
        got, want = loaded(x).logits, built.eval()(x).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_student_loads_in_vllm(matrix, family):
    """vLLM generates from the saved (teacher-initialised) student, and the top-k it reports for
    each generated token is the one transformers computes for that sequence."""
    from actors.hf_backend import HFBackend
    from actors.vllm_backend import VLLMBackend
    from orchestrator.teacher_info import load_tokenizer

    path = matrix.student(family, init=True)
    prompt = load_tokenizer(path)("def main(args):\n    return")["input_ids"]
    engine = VLLMBackend(path, mode="sample", k=K, dtype="float32", max_model_len=256,
                         kv_cache_gib=0.25, seed=0)
    try:
        out = engine.sample([prompt], k=K, n=1, temperature=1.0, top_p=1.0, max_new_tokens=8,
                            seeds=[1], eos_id=None)[0][0]
    finally:
        engine.close()
    assert out.topk_ids.shape == (8, K)
    n = len(prompt)
    scored = HFBackend(path, dtype="float32").score([list(out.input_ids)], k=K)[0]
    ref = type(out)(out.input_ids, n, n - 1, scored.topk_ids[n - 1:n + 7],
                    scored.topk_logprobs[n - 1:n + 7], scored.target_logprobs[n - 1:n + 7],
                    scored.tail_mass[n - 1:n + 7])
    agree(out, ref, atol=ATOL)
    np.testing.assert_allclose(out.tail_mass, ref.tail_mass, atol=ATOL)


@pytest.mark.slow
def test_one_serve_app_serves_a_student_of_every_family(matrix):
    """One real Ray Serve application hosts a student per family (one replica holds them all);
    each answers a completion over real HTTP with text."""
    from openai import OpenAI

    from orchestrator.winners import ServedModel
    from serve import app

    models = [ServedModel(id=f"{family}-student", path=matrix.student(family, init=True))
              for family in FAMILIES]
    url = app.start(models, serve_settings(models_per_replica=len(models), replica_cpus=0.5))
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert sorted(m.id for m in client.models.list().data) == sorted(m.id for m in models)
        for m in models:
            out = client.completions.create(model=m.id, prompt="def f(", max_tokens=8,
                                            temperature=0)
            choice = out.choices[0]
            assert choice.text and out.usage.completion_tokens >= 1, (m.id, out)
    finally:
        app.stop()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # llama: tests/test_onpolicy.py
def test_on_policy_student_learns_from_its_own_scored_samples(matrix, family, tmp_path):
    """A purely on-policy student of a non-Llama family (attention biases; tied, soft-capped head
    and sandwich norms): the rollout engine takes the trainer's weights, the family's teacher
    scores the samples, and 4 Ray Train steps learn from them (reverse KL on the generated tokens
    only; no offline part)."""
    import ray
    from transformers import AutoConfig

    from actors.pool import TeacherActor
    from actors.rollout import RolloutActor
    from orchestrator.kd.losses import LossSpec
    from orchestrator.kd.student import student_config
    from orchestrator.shapes import resolve_shape
    from orchestrator.shards.specs import EngineSpec
    from orchestrator.teacher_info import inspect_teacher, load_tokenizer
    from orchestrator.train.launch import fit_student
    from orchestrator.train.specs import (DataSpec, EvalSpec, OnPolicySpec, OptimSpec,
                                          RolloutEngineSpec, RunSpec, StudentSpec, TrainSpec)

    teacher, cap = matrix.teacher(family), matrix.capture(family)
    shape = resolve_shape(preset="nano")
    model_dir = tmp_path / "rollout-model"
    student_config(AutoConfig.from_pretrained(teacher), shape).save_pretrained(model_dir)
    load_tokenizer(teacher).save_pretrained(model_dir)
    retry = {"max_restarts": 1, "max_task_retries": 1}
    rollout = RolloutActor.options(num_cpus=0.25, **retry).remote(
        RolloutEngineSpec(model_dir=str(model_dir), backend="hf", max_model_len=128))
    scorer = TeacherActor.options(num_cpus=0.25, **retry).remote(EngineSpec(
        backend="hf", model=teacher, revision=None, mode="score", max_k=K, dtype="float32",
        scoring="hidden", memory_fraction=0.1, kv_cache_gib=None, max_model_len=128,
        tensor_parallel_size=1, chunk_rows=64, batch_tokens=2048, seed=0))
    try:
        spec = TrainSpec(
            student=StudentSpec(teacher_model=teacher, shape=shape, init_from_teacher=False),
            data=DataSpec(shards_uri=cap["out"], units=list(range(cap["units"])),
                          streaming=False, expect={"tokenizer_fingerprint": inspect_teacher(
                              teacher).tokenizer_fingerprint}),
            loss=LossSpec(kind="fkl", temperature=1.0, alpha=0.5, beta=0.5, tail="renormalize"),
            optim=OptimSpec(lr=2e-3, warmup_steps=1, batch_size=2, grad_accum=1, max_steps=4,
                            seed=3),
            eval=EvalSpec(every=4, heldout_uri=None, samples=0),
            run=RunSpec(log_every=2, label="onpolicy"),
            on_policy=OnPolicySpec(share=1.0, loss=LossSpec("rkl", 1.0, 1.0, 0.5, "renormalize"),
                                   rollout_actors=(rollout,), teacher_actors=(scorer,), k=K,
                                   max_length=128, max_new_tokens=8, prompts="prefix",
                                   prompt_tokens=8))
        result = fit_student(spec, storage=str(tmp_path / "runs"), name="onpolicy",
                             num_workers=0, use_gpu=False, cpus_per_worker=1, max_failures=0)
    finally:
        for actor in (rollout, scorer):
            ray.kill(actor, no_restart=True)
    last = result.history[-1]
    assert last["step"] == 4 and last["kd"] == 0.0 and np.isfinite(last["onpolicy_kd"])
    assert last["onpolicy_kd"] > 0 and last["onpolicy_samples_per_s"] > 0
    assert 0 < last["onpolicy_new_tokens"] <= 8 and last["onpolicy_staleness_max"] <= 1
