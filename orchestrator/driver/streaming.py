"""The capture thread of `run` (driver-internal): teachers capture in the driver while the KD
student trains on the shards already published; the shard board paces both ways (backpressure)."""

from __future__ import annotations

import sys
import threading

from orchestrator.driver.capture_run import Teachers
from orchestrator.errors import RaydistillError
from orchestrator.shards.plan import CaptureKind, CapturePlan


class CaptureThread:
    """Captures running beside the KD student's training (in the driver): the streamed main
    capture, paused by the board, then the baselines' captures."""

    def __init__(self, teachers: Teachers, plans: list[CapturePlan], board):
        import ray

        self.error: BaseException | None = None
        self.stop = threading.Event()

        def may_submit(waited: float) -> bool:
            if self.stop.is_set():
                raise RaydistillError("stopped: training ended before the capture")
            return ray.get(board.may_capture.remote(waited))

        def body() -> None:
            try:
                for plan in plans:  # the streamed capture (if any) first, under backpressure
                    if self.stop.is_set():
                        return
                    streamed = plan.kind is CaptureKind.MAIN
                    teachers.capture(plan, may_submit=may_submit if streamed else None,
                                     quiet=True, on_published=(lambda n: board.publish.remote(n))
                                     if streamed else None)
            except BaseException as e:  # noqa: BLE001 — handed to the main thread in finish()
                self.error = e
                board.capture_failed.remote(str(e) or type(e).__name__)

        self.thread = threading.Thread(target=body, name="capture", daemon=True)
        self.thread.start()

    def finish(self) -> None:
        """Wait for the capture (training is done or failed); re-raise its error."""
        if sys.exc_info()[0] is not None:  # training failed: stop sending work
            self.stop.set()
        self.thread.join()
        if self.error is not None and not self.stop.is_set():
            raise self.error
