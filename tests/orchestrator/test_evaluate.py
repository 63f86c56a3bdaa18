"""Held-out evaluation: the teacher measured against its own labels is perfect, a random student
is not; gap-recovered arithmetic."""

from __future__ import annotations

import math

import pytest

from orchestrator.kd.evaluate import evaluate, finish, gap_recovered
from orchestrator.shards.format import read_shards


def test_teacher_against_its_own_labels(captured):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.kd.student import build_student
    from orchestrator.shapes import resolve_shape

    samples = list(read_shards(captured["out"], capture="heldout"))
    teacher = AutoModelForCausalLM.from_pretrained(captured["model"], dtype=torch.float32)
    m = finish(evaluate(teacher, samples, batch_size=4))
    assert m["eval_positions"] > 100
    assert m["eval_kl"] < 2e-3                      # only the shard quantisation differs
    assert m["eval_top1"] > 0.99
    assert m["eval_student_nll"] == pytest.approx(m["eval_teacher_nll"], abs=1e-2)

    student, _ = build_student(AutoConfig.from_pretrained(captured["model"]),
                               resolve_shape(preset="nano"), seed=0)
    s = finish(evaluate(student, samples, batch_size=4))
    assert s["eval_kl"] > 0.1 and s["eval_top1"] < 0.5
    assert s["eval_teacher_nll"] == pytest.approx(m["eval_teacher_nll"])
    assert math.isfinite(s["eval_student_ppl"])


def test_gap_recovered():
    assert gap_recovered(student_nll=3.75, scratch_nll=4.43, teacher_nll=3.48) == \
        pytest.approx(0.7158, abs=1e-3)
    assert gap_recovered(student_nll=4.0, scratch_nll=3.0, teacher_nll=3.0) is None
