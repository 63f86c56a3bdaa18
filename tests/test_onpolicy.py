"""On-policy distillation end to end on tiny models (issue 15): student rollout actors (vLLM and
the transformers fallback) refreshed with the trainer's weights, teacher actors scoring their
samples, mixed and purely on-policy Ray Train runs, and the faults (a killed rollout or teacher
actor, a killed train worker, Ctrl-C then --resume).

    PYTHONPATH=$PWD python -m pytest -q tests/test_onpolicy.py
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import capture_folder, interrupt_train_then_resume, train_config

pytestmark = pytest.mark.slow


def _report(out, exp: str | None = None) -> dict:
    root = Path(out) / "experiments"
    exp = exp or sorted(os.listdir(root))[-1]
    return json.loads((root / exp / "report.json").read_text())


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def source_parts(captured, tmp_path_factory):
    """A nano student of the tiny teacher, its rollout model dir (config + tokenizer only), and
    the stream rows of the capture (prompts)."""
    from transformers import AutoConfig

    from orchestrator.kd.student import build_student, student_config
    from orchestrator.shapes import resolve_shape
    from orchestrator.shards.format import read_shards
    from orchestrator.teacher_info import load_tokenizer

    root = tmp_path_factory.mktemp("rollout-model")
    teacher_cfg = AutoConfig.from_pretrained(captured["model"])
    shape = resolve_shape(preset="nano", layers=None, hidden=None, heads=None, intermediate=None)
    student_config(teacher_cfg, shape).save_pretrained(root)
    load_tokenizer(captured["model"]).save_pretrained(root)
    model, _ = build_student(teacher_cfg, shape, seed=3)
    rows = list(read_shards(str(capture_folder(captured["out"]))))
    return {"dir": str(root), "model": model.eval(), "rows": rows}


def _source(parts, captured, *, backend: str, staleness: int, rollout=None, scorer=None):
    """An OnPolicySource (one worker) over real actors; returns (source, rollout, scorer)."""
    from actors.pool import TeacherActor
    from actors.rollout import RolloutActor
    from orchestrator.kd.losses import LossSpec
    from orchestrator.shards.specs import EngineSpec
    from orchestrator.train.onpolicy import OnPolicySource
    from orchestrator.train.specs import OnPolicySpec, RolloutEngineSpec

    retry = {"max_restarts": 3, "max_task_retries": 3}
    if rollout is None:
        rollout = RolloutActor.options(num_cpus=0.25, **retry).remote(RolloutEngineSpec(
            model_dir=parts["dir"], backend=backend, max_model_len=128, kv_cache_gib=0.25))
    if scorer is None:
        scorer = TeacherActor.options(num_cpus=0.25, **retry).remote(EngineSpec(
            backend="hf", model=captured["model"], revision=None, mode="score", max_k=8,
            dtype="float32", scoring="hidden", memory_fraction=0.1, kv_cache_gib=None,
            max_model_len=128, tensor_parallel_size=1, chunk_rows=64, batch_tokens=2048, seed=0))
    spec = OnPolicySpec(share=1.0, loss=LossSpec("rkl", 1.0, 1.0, 0.5, "renormalize"),
                        rollout_actors=(rollout,), teacher_actors=(scorer,), k=8, stop_ids=(),
                        max_length=128, max_new_tokens=6, temperature=0.0, prompts="prefix",
                        prompt_tokens=5, sync_every=1, max_staleness=staleness)
    source = OnPolicySource(spec, prompts=iter(parts["rows"] * 10), per_step=3, rank=0, world=1,
                            seed=0, label="t")
    return source, rollout, scorer


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_rollouts_use_the_trainers_latest_weights_and_survive_killed_actors(
        source_parts, captured, ray_session, backend):
    """Greedy rollouts equal transformers' greedy continuation of the weights last synced —
    before and after a refresh with other weights — the teacher's scores come with them, the
    staleness is what max_staleness allows, and a killed rollout actor and a killed teacher
    actor are replaced with the step completing on the same weights."""
    import copy

    import ray

    model = source_parts["model"]
    source, rollout, scorer = _source(source_parts, captured, backend=backend, staleness=0)
    source.sync(model.state_dict(), 0)
    rows = source.take(0)
    assert len(rows) == 3
    for row in rows:
        prompt = row["input_ids"][:row["prompt_len"]].tolist()
        assert row["input_ids"][row["prompt_len"]:].tolist() == _greedy(model, prompt, 6)
        assert row["loss_mask"].sum() == len(row["input_ids"]) - row["prompt_len"]
        assert row["topk_ids"].shape == (len(row["input_ids"]), 8)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    source.sync(other.state_dict(), 1)
    rows = source.take(1)
    changed = 0
    for row in rows:
        prompt = row["input_ids"][:row["prompt_len"]].tolist()
        new = row["input_ids"][row["prompt_len"]:].tolist()
        assert new == _greedy(other, prompt, 6)
        changed += new != _greedy(model, prompt, 6)
    assert changed > 0, "the refreshed weights did not change any rollout"
    m = source.metrics(wall_s=1.0, train_s=0.5)
    assert m["onpolicy_staleness_max"] == 0 and m["onpolicy_samples_per_s"] == 6
    assert m["onpolicy_load_s"] > 0 and m["onpolicy_generate_s"] > 0 and m["onpolicy_score_s"] > 0

    # faults: both actors killed between steps; the next step reloads the weights and completes
    for actor in (rollout, scorer):
        pid = ray.get(actor.ready.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
    rows = source.take(2)
    assert len(rows) == 3
    for row in rows:
        prompt = row["input_ids"][:row["prompt_len"]].tolist()
        assert row["input_ids"][row["prompt_len"]:].tolist() == _greedy(other, prompt, 6)
    assert ray.get(rollout.ready.remote())["pid"] != pid

    # overlap (max_staleness 1): step n + 1's samples are asked for before step n trains
    lagging, _, _ = _source(source_parts, captured, backend=backend, staleness=1,
                            rollout=rollout, scorer=scorer)
    lagging.sync(model.state_dict(), 0)
    lagging.take(0)
    assert 1 in lagging.pending  # asked for during step 0
    lagging.sync(other.state_dict(), 1)
    rows = lagging.take(1, prefetch=False)
    prompt = rows[0]["input_ids"][:rows[0]["prompt_len"]].tolist()
    # generated with step 0's weights: one step stale, as reported
    assert rows[0]["input_ids"][rows[0]["prompt_len"]:].tolist() == _greedy(model, prompt, 6)
    assert lagging.metrics(wall_s=1.0, train_s=0.5)["onpolicy_staleness_max"] == 1
    for actor in (rollout, scorer):
        ray.kill(actor, no_restart=True)


def test_mixed_and_on_policy_students_train_with_vllm_rollouts(captured, tmp_path):
    """`raydistill train` with train.on_policy 0.5 (a vLLM rollout engine of the student, the
    teacher scoring its samples) beside the offline KD student of the same budget: both finish,
    the report shows the on-policy time shares, and the mixed student's history has the
    on-policy figures."""
    from orchestrator.driver import pipeline

    out = tmp_path / "out"
    import shutil

    shutil.copytree(captured["out"], out, ignore=shutil.ignore_patterns("experiments"))
    cfg = train_config(out, captured["model"], captured["data"], **{
        "train.on_policy": 0.5, "train.baselines": "[offline]", "train.max_steps": 8,
        "train.eval_every": 4, "train.log_every": 2, "on_policy.max_new_tokens": 12,
        "on_policy.prompt_tokens": 8, "on_policy.backend": "vllm",
        "on_policy.kv_cache_gib": 0.25, "on_policy.rollout_cpus": 0.25,
        "on_policy.teacher_cpus": 0.25})
    report_md = pipeline.train(cfg)
    report = _report(out)
    kd, offline = report["history"]["kd"], report["history"]["offline"]
    assert kd[-1]["step"] == offline[-1]["step"] == 8
    last = kd[-1]
    assert last["onpolicy_samples_per_s"] > 0 and last["onpolicy_kd"] > 0
    assert 0 <= last["onpolicy_staleness_max"] <= 1  # max_staleness 1 (overlap)
    assert 0 < last["onpolicy_new_tokens"] <= 12
    for share in ("generate", "score", "sync", "train"):
        assert last[f"onpolicy_{share}_share"] > 0, share
    assert "onpolicy_kd" not in offline[-1]
    # the offline student trains alone and uses both of the session's CPUs; the mixed one keeps
    # its reservation (a core) while its rollout and scoring actors generate beside it
    assert offline[-1]["threads"] == 2 and kd[-1]["threads"] == 1
    text = Path(report_md).read_text()
    assert "On-policy" in text and "rollout" in text


def test_purely_on_policy_worker_resumes_after_a_kill_and_ctrl_c_resumes(captured, ray_session,
                                                                           tmp_path):
    """train.on_policy 1 after 2 offline steps (on_policy.start_step), with the transformers
    rollout fallback: a train worker killed after a checkpoint resumes from it (the prompts'
    position restored; rollouts regenerated), no step lost or repeated; then a driver
    interrupted with Ctrl-C resumes with --resume."""
    import ray

    from orchestrator.driver.specs import train_spec
    from orchestrator.driver.onpolicy import OnPolicyActors
    from orchestrator.shards.plan import CaptureKind, plan_captures
    from orchestrator.train.board import ShardBoard
    from orchestrator.train.launch import fit_student

    cfg = train_config(captured["out"], captured["model"], captured["data"], **{
        "train.on_policy": 1.0, "train.max_steps": 12, "train.eval_every": 4,
        "train.log_every": 1, "on_policy.max_new_tokens": 8, "on_policy.prompt_tokens": 8,
        "on_policy.backend": "hf", "on_policy.start_step": 2, "on_policy.rollout_cpus": 0.25,
        "on_policy.teacher_cpus": 0.25})
    plans = plan_captures(cfg, command="train")
    main = plans[0]
    held = next(p for p in plans if p.kind is CaptureKind.HELDOUT)
    board = ray.remote(ShardBoard).options(num_cpus=0).remote(max_ahead=1)
    killed = []

    def killer():
        while not killed:
            m = ray.get(board.snapshot.remote())["metrics"].get("kd")
            if m and m["step"] >= 7:  # the checkpoint at 4 is persisted
                os.kill(m["pid"], signal.SIGKILL)
                killed.append(m["step"])
            time.sleep(0.05)

    threading.Thread(target=killer, daemon=True).start()
    with OnPolicyActors(cfg, main, storage=str(tmp_path)) as actors:
        spec = train_spec(cfg, plan=main, held=held, alpha=cfg.train.alpha, board=board,
                          streaming=False, label="kd")
        from dataclasses import replace

        spec = replace(spec, on_policy=actors.spec())
        hit = fit_student(spec, storage=str(tmp_path), name="kd", num_workers=1, use_gpu=False,
                          cpus_per_worker=0.5, max_failures=2)
    killed.append(-1)
    assert killed[0] > 0, "the worker was never killed"
    steps = [h["step"] for h in hit.history]
    assert steps == sorted(set(steps)) and steps[-1] == 12
    assert hit.final["resumed_from"] in (4, 8) and hit.final["resumed_from"] < killed[0]
    assert hit.final["kd"] == 0.0 and hit.final["onpolicy_kd"] > 0  # no offline part at λ = 1
    # on_policy.start_step 2: the first two steps are offline only, the rest on-policy only
    first = hit.history[0]
    assert first["step"] == 1 and first["kd"] > 0 and first["onpolicy_samples_per_s"] == 0
    assert all(h["kd"] == 0.0 and h["onpolicy_samples_per_s"] > 0 for h in hit.history[2:])
    assert np.isfinite(hit.final["eval_student_nll"])

    # Ctrl-C: the driver stops, says how to resume, and --resume finishes the run
    path = tmp_path / "c.yaml"
    from dataclasses import asdict

    path.write_text(json.dumps({k: asdict(getattr(cfg, k)) for k in
                                ("teacher", "data", "capture", "student", "train", "on_policy")}
                               | {"output_dir": captured["out"]}))
    exp = interrupt_train_then_resume(["train", str(path), "--set", "train.baselines=[]"],
                                      ray_address=ray_session.address_info["address"],
                                      output_dir=captured["out"])
    kd = _report(captured["out"], exp)["history"]["kd"]
    assert kd[-1]["step"] == 12 and kd[-1]["resumed_from"] >= 4
    assert [h["step"] for h in kd] == sorted({h["step"] for h in kd})
