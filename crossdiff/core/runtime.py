"""Process-wide policy in one place: OpenMP threads and waiting, the heap allocator, the device.

- `before_torch()`: environment that OpenMP reads once, when torch loads it. The CLI calls it
  first thing (crossdiff/cli.py); a value the user exported wins.
- `apply_cpu_policy()`: the heap allocator policy, once per process; every stage that computes on
  the CPU calls it (harvest, train, analyze), and a second call does nothing.
- `resolve_device(name)`: a torch device from cpu, cuda, cuda:N or auto.

Why these settings (docs/training.md, "CPU on a busy machine"):
- OMP_WAIT_POLICY=PASSIVE: an OpenMP thread that reaches the end of a parallel region sleeps
  instead of spinning. On a machine where other processes compete for the cores a spinning thread
  burns the time slice its descheduled sibling needs, and every one of the hundreds of parallel
  regions of a training step waits for the slowest thread.
- OMP_NUM_THREADS = the cores this process may use (its CPU affinity, capped by a cgroup CPU
  quota): in a container limited to 2 CPUs on a 16-core host, torch would otherwise start 16
  threads on 2 CPUs' worth of time.
- The allocator keeps freed memory in the process heap (glibc): see `apply_cpu_policy`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from .errors import CrossdiffError

_APPLIED: set[str] = set()


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def before_torch() -> None:
    """Set OMP_WAIT_POLICY and OMP_NUM_THREADS unless the user did; effective only before torch
    (and its OpenMP runtime) is loaded."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(available_cpus()))


def apply_cpu_policy() -> bool:
    """Keep freed memory in the process heap (glibc), once per process; True if applied.

    glibc hands every freed block above 32 MB back to the OS, so each training step's (B, F)
    buffers and fresh gradients come back as zeroed pages: measured ~84k page faults per sparse step
    and ~416k per dense step at d=576/640, D=16384, B=1024 (up to 25% of a step on 2 cores). PyTorch
    has no caching allocator on CPU, so we ask malloc to keep large blocks instead. The harvest used
    the opposite policy (every block above 1 MiB mmap-ed and returned) against a slow RSS creep;
    one `crossdiff diff` process runs both, and a process can only have one policy: the measured
    harvest peak with this one is in docs/store.md. Costs: resident memory stays at its peak until
    the process exits.
    """
    if "allocator" in _APPLIED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
        ok = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False
    if ok:
        _APPLIED.add("allocator")
    return ok


def resolve_device(name: str):
    """A torch device from cpu, cuda, cuda:N or auto (cuda when available), with a one-line error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CrossdiffError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrossdiffError(
            f"--device {name} was asked for but no CUDA device is available; use --device cpu"
        )
    return device
