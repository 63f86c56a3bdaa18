"""How many torch threads a CPU train worker gets (`train.launch.worker_threads`): Ray starts a
worker reserving under 2 CPUs with OMP_NUM_THREADS=1, so a student trained alone would leave the
rest of its node idle. The live runs check the same numbers in the students' history
(tests/test_train.py::test_two_ddp_workers, tests/test_onpolicy.py mixed run)."""

from __future__ import annotations

import pytest

from orchestrator.train.launch import worker_threads


@pytest.mark.parametrize("workers, cpus_per_worker, node_cpus, want", [
    (1, 0.5, [2.0], 2),            # the demo: one worker alone on 2 cores uses both
    (1, 0.5, [0.0, 16.0, 8.0], 16),  # a head without CPUs; the largest worker node
    (2, 0.5, [2.0], 1),            # two DDP workers packed on 2 cores: one core each
    (4, 1.0, [16.0, 16.0], 4),     # Ray Train packs all four onto one 16-core node
    (4, 8.0, [16.0, 16.0], 8),     # two fit a node: each gets half of it
    (1, 0.5, [], 1),
])
def test_a_student_alone_gets_its_nodes_cores(workers, cpus_per_worker, node_cpus, want):
    assert worker_threads(alongside=1, num_workers=workers, cpus_per_worker=cpus_per_worker,
                          use_gpu=False, node_cpus=node_cpus) == want


def test_side_by_side_a_worker_keeps_its_reservation_and_gpus_are_left_alone():
    for reserved, want in ((0.5, 1), (1.0, 1), (4.0, 4)):
        assert worker_threads(alongside=2, num_workers=1, cpus_per_worker=reserved,
                              use_gpu=False, node_cpus=[16.0]) == want
    assert worker_threads(alongside=1, num_workers=1, cpus_per_worker=0.5, use_gpu=True,
                          node_cpus=[16.0]) == 0
