"""Constants and small helpers shared by the capture benchmark's modules."""

from __future__ import annotations

import resource
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
