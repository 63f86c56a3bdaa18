"""Constants and small helpers shared by the benchmarks: the capture benchmark's settings, timing
and memory helpers, and `machine_facts` / `machine_line` — what every benchmark prints about the
machine it ran on, detected at run time (never written by hand)."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "raydistill"
K = 64
VOCAB = 32000
SEQ = 256
BATCH_TOKENS = 8192  # the HF backend's default batch size in tokens; the reference uses the same
NAIVE_BYTES = K * (2 + 4)  # fp16 log-prob + int32 id per entry = 384 B/token
TARGET_RATIO = 0.85
TARGET_BYTES = 96
TARGET_NATS = 0.01
Q = 51  # explored encodings quantise log-probs to 1/51 nat (max error 1/102 ≈ 0.0098 nat)
SECTION = "## Capture (issue 2)"
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_=1048576"

_T0 = time.time()


def machine_facts() -> dict:
    """The machine as detected now: CPU model and count, RAM, GPUs, 1-min load average.

    CPU model from /proc/cpuinfo (else `platform.processor()`); `cpus` = logical CPUs this process
    may use (sched_getaffinity), `cpus_total` = os.cpu_count(); GPUs from torch.cuda when torch
    sees them, else from `nvidia-smi -L`, else an empty list."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    affinity = getattr(os, "sched_getaffinity", None)
    return {"cpu": cpu, "cpus": len(affinity(0)) if affinity else os.cpu_count(),
            "cpus_total": os.cpu_count(), "ram_gib": ram, "gpus": _gpus(),
            "python": platform.python_version(), "load_1min": os.getloadavg()[0]}


def _gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 — a broken CUDA install reads as no GPU seen by torch
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
            return [line.split(":", 1)[1].split("(UUID")[0].strip()
                    for line in out.stdout.splitlines() if line.startswith("GPU ")]
        except (OSError, subprocess.SubprocessError):
            pass
    return []


def machine_line(facts: dict, *, load_end: float | None = None) -> str:
    """One sentence of measured machine facts for a benchmark's output, e.g. "Machine (detected
    at run time): AMD EPYC 9R14, 2 logical CPUs, 24 GiB RAM, no GPU detected (torch.cuda,
    nvidia-smi); Python 3.11.7; 1-min load average 1.4 at the start, 2.1 at the end." A load
    above the CPU count is stated as what it means, nothing more is assumed about the machine."""
    gpus = facts.get("gpus")
    if gpus is None:  # results saved before GPUs were recorded
        gpu = "GPU not recorded"
    elif gpus:
        names = sorted(set(gpus))
        gpu = ", ".join(f"{gpus.count(n)} × {n}" for n in names)
    else:
        gpu = "no GPU detected (torch.cuda, nvidia-smi)"
    cpus = facts.get("cpus") or facts.get("cores")
    cpus_text = f"{cpus} logical CPUs" + (f" (of {facts['cpus_total']})"
                                          if facts.get("cpus_total") not in (None, cpus) else "")
    loads = [facts["load_1min"]] + ([load_end] if load_end is not None else [])
    load = f"1-min load average {loads[0]:.1f} at the start" + (
        f", {loads[1]:.1f} at the end" if len(loads) > 1 else "")
    busy = (f" (above {cpus}: threads, this run's own included, queued for the CPUs)"
            if max(loads) > cpus else "")
    return (f"Machine (detected at run time): {facts['cpu']}, {cpus_text}, "
            f"{facts['ram_gib']:.0f} GiB RAM, {gpu}; Python {facts['python']}; {load}{busy}.")


def log(msg: str) -> None:
    print(f"[{time.time() - _T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Teacher and batch
# ----------------------------------------------------------------------------------------------


def child_pids() -> list[str]:
    """Live (non-zombie) vLLM processes under this one."""
    try:
        import psutil

        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "VLLM" in p.name() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid}:{p.name()}")
            except psutil.Error:
                pass
        return out
    except Exception:  # noqa: BLE001
        return []


def vm_hwm_mib() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:2000]


# ----------------------------------------------------------------------------------------------
# Speed measurements
# ----------------------------------------------------------------------------------------------


def make_batch(teacher: Path, n: int, seq: int = SEQ) -> list[list[int]]:
    """`n` windows of `seq` held-out tokens, evenly spaced (overlapping if the text is short)."""
    ids = np.load(teacher / "heldout_ids.npy")
    span = len(ids) - seq
    stride = max(1, span // max(1, n))
    return [ids[(i * stride) % span:][:seq].tolist() for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Timing and comparisons
# ----------------------------------------------------------------------------------------------


def stack(sls, attr: str) -> np.ndarray:
    return np.concatenate([getattr(s, attr) for s in sls])


def peak_rss(run, *, interval_s: float = 0.002) -> tuple[int, int, float]:
    """Run `run()` while polling this process's RSS; returns (rss before, peak rss, seconds)."""
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t = time.perf_counter()
    try:
        run()
    finally:
        secs = time.perf_counter() - t
        stop.set()
        th.join()
    return base, max(peak[0], proc.memory_info().rss), secs


def write_section(section: str, text: str) -> Path:
    """Replace (or append) one benchmark's `## section` of BENCHMARKS.md with `text`."""
    path = REPO / "BENCHMARKS.md"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    if section in body:
        head, rest = body.split(section, 1)
        nxt = rest.find("\n## ")
        body = head + text + (rest[nxt:] if nxt >= 0 else "\n")
    else:
        body = body.rstrip() + "\n\n" + text
    path.write_text(body)
    return path
