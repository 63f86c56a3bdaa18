"""Where a vLLM engine in a raydistill actor runs its engine core.

vLLM starts its engine core, and on a CPU a model worker under it, as two more processes, each
importing torch and vLLM again, and sends every request and result between them. A GPU needs that
split (the GPU works while the CPU schedules). On a node without one, the actor's own process is
better (`python -m benchmarks.engine_process`, demo teacher, 2 CPUs): an engine starts in 9 s
instead of 23 s (a second one in the same process in 0.4 s instead of 15 s); on one thread it
scores as fast as the default does on two cores (the hidden states no longer cross a socket, no
engine-core process polls a core) and samples at 0.87× its speed on half the CPU; two idle engines
take 0.02 cores instead of 0.22. The engine uses the threads Ray gives the actor (its num_cpus),
not cores it picks for itself beside the ones Ray gave others.

`VLLM_ENABLE_V1_MULTIPROCESSING` set by the user (on the cluster, or in a job's runtime_env) wins.
"""

from __future__ import annotations

import os

ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def engine_core_in_this_process() -> None:
    """Called first thing in a teacher or rollout actor, before any vLLM engine exists in it: no
    GPU here → vLLM's engine core runs in this process (the user's own setting wins)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault(ENV, "0")
