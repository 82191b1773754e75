"""Shared pieces of the benchmark scripts: interleaved timing, machine facts, peak RSS of a child process.

Timings are medians of repetitions in which every arm runs once per round (arm A, arm B, arm A, arm B, ...), so noise
from other processes on the machine hits all arms alike and the ratios between arms stay meaningful.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Row:
    """One line of BENCHMARKS.md."""

    section: str
    name: str
    measured: str  # what was measured, with units (e.g. "0.81 s vs 1.02 s")
    ratio: float | None  # the headline ratio (None when the row only reports a value)
    goal: str  # e.g. ">= 1.5x", or "-" when the issue sets none
    met: bool | None  # None when there is no goal
    command: str
    note: str = ""


@dataclass
class Timer:
    """Interleaved timing of named arms: `run(arms, repeats)` -> {name: median seconds}."""

    warmup: int = 1
    samples: dict = field(default_factory=dict)

    def run(self, arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
        for _ in range(self.warmup):
            for fn in arms.values():
                fn()
        self.samples = {name: [] for name in arms}
        for _ in range(repeats):
            for name, fn in arms.items():
                start = time.perf_counter()
                fn()
                self.samples[name].append(time.perf_counter() - start)
        return {name: statistics.median(t) for name, t in self.samples.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict:
    import torch
    import transformers

    return {
        "CPU": cpu_model(),
        "cores (os.cpu_count)": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "Python": platform.python_version(),
        "platform": platform.platform(),
    }


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux, in KiB there) in bytes; None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size since start or the last `reset_peak_rss()`: Linux's VmHWM, else
    ru_maxrss (KiB on Linux)."""
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    current = _proc_status_bytes("VmRSS")
    return current if current is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux: write 5 to /proc/self/clear_refs), so a later `peak_rss_bytes()`
    measures one step rather than model building; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_child(module: str, args: list[str], timeout: float = 900) -> dict:
    """Run `python bench/<module>.py --child ARGS` in a fresh process (so its peak RSS is its own) and return the
    JSON object it prints on its last stdout line."""
    cmd = [sys.executable, str(ROOT / "bench" / f"{module}.py"), "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
