"""The demo teacher's quality is measured against a floor: a cached teacher that trained its full
step budget but sits above the expected held-out NLL is named weaker, with the rebuild command."""

from orchestrator.driver.demo import DEFAULT_TEACHER_STEPS, TEACHER_NATS_FLOOR, describe_teacher


def _metrics(nats: float, steps: int = DEFAULT_TEACHER_STEPS) -> dict:
    return {"heldout_nats": nats, "unigram_nats": 6.61, "steps": steps, "train_minutes": 11.0}


def test_a_teacher_at_or_below_the_floor_is_described_plainly():
    line = describe_teacher(_metrics(3.99))
    assert "held-out 3.99 nats/token" in line and f"expected ≤ {TEACHER_NATS_FLOOR:g}" in line
    assert "weaker" not in line and "--rebuild" not in line


def test_a_teacher_above_the_floor_is_named_weaker_with_the_rebuild_command():
    line = describe_teacher(_metrics(4.57))
    assert "4.57 nats/token is above the 4.1" in line and "weaker teacher" in line
    assert "demo --rebuild" in line


def test_a_teacher_short_of_its_step_budget_is_named_weaker():
    line = describe_teacher(_metrics(4.57, steps=338))
    assert f"fewer steps than the default {DEFAULT_TEACHER_STEPS}" in line and "--rebuild" in line
