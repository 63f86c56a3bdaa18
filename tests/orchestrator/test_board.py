"""The streaming board's backpressure rule (plain class, no Ray)."""

from orchestrator.train.board import ShardBoard


def test_capture_pauses_when_ahead_of_the_readers_and_runs_free_after_training():
    board = ShardBoard(max_ahead=2)
    assert board.may_capture()
    board.publish(2)
    assert not board.may_capture(0.5)
    board.shard_read("kd", 0)
    board.shard_read("kd", 0)  # a re-read (later epoch, restarted worker) counts once
    assert board.may_capture()
    board.publish(3)
    assert not board.may_capture(0.5)
    board.shard_read("hard", 1)  # other students do not count
    assert not board.may_capture()
    board.train_done("kd")
    assert board.may_capture()
    snap = board.snapshot()
    assert snap["capture_paused_s"] == 1.0 and snap["read"] == {"kd": 1, "hard": 1}


def test_a_capture_failure_is_visible_to_readers():
    board = ShardBoard(max_ahead=4)
    assert board.capture_failure() is None
    board.capture_failed("teacher OOM")
    assert board.capture_failure() == "teacher OOM"
