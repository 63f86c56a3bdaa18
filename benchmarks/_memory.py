"""Peak-memory probes of teacher scoring runs, each in a fresh subprocess."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks._common import BATCH_TOKENS, K, REPO, SEQ, make_batch, peak_rss, vm_hwm_mib


def memory_probe(spec: dict) -> dict:
    """Runs in a fresh subprocess: load, score, and report RSS (before, peak while scoring)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    teacher = Path(spec["teacher"])
    seqs = make_batch(teacher, spec["n"], spec.get("seq", SEQ))
    if spec["kind"] == "hf":
        from actors.hf_backend import HFBackend

        be = HFBackend(str(teacher), chunk_rows=spec["chunk_rows"])
        run = lambda: be.score(seqs, k=K)  # noqa: E731
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32,
                                                     local_files_only=True).eval()
        ids = torch.tensor(seqs)
        rows = max(1, BATCH_TOKENS // ids.shape[1])

        def run():
            for b in range(0, ids.shape[0], rows):
                model(input_ids=ids[b:b + rows]).logits  # noqa: B018  (each batch's logits dropped)
    gc.collect()

    def scored():
        with torch.inference_mode():
            run()

    base, top, secs = peak_rss(scored)
    peak = [top]
    return {**spec, "tokens": sum(map(len, seqs)), "seconds": secs,
            "rss_before_mib": base / 2**20, "peak_scoring_mib": peak[0] / 2**20,
            "delta_mib": (peak[0] - base) / 2**20, "hwm_mib": vm_hwm_mib()}


def run_probe(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.capture", "--_probe", json.dumps(spec)]
    env = {**os.environ, **spec.get("env", {})}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {**spec, "error": (p.stderr or p.stdout)[-2000:]}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
