"""Process-wide policy (crossdiff/core/runtime.py): set before torch loads, applied once, user values win."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossdiff.core import runtime
from crossdiff.core.errors import CrossdiffError

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_cli_sets_openmp_policy_before_torch_loads():
    # The CLI module must not import torch: main() sets the OpenMP environment first.
    code = (
        "import sys, os; from crossdiff import cli; assert 'torch' not in sys.modules; "
        "from crossdiff.core import runtime; runtime.before_torch(); import torch; "
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"
    )
    policy, threads, torch_threads = _python(code).split()
    assert policy == "PASSIVE" and int(threads) == runtime.available_cpus() == int(torch_threads)


def test_user_openmp_settings_win():
    code = "import os; from crossdiff.core import runtime; runtime.before_torch(); import torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1").split() == ["ACTIVE", "1"]


def test_available_cpus_is_within_the_affinity_mask():
    assert 1 <= runtime.available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_policy_is_applied_once_and_kept():
    code = (
        "from crossdiff.core import runtime; a = runtime.apply_cpu_policy(); "
        "b = runtime.apply_cpu_policy(); print(a, b, sorted(runtime._APPLIED))"
    )
    assert _python(code) == "True True ['allocator']"


def test_resolve_device_errors_in_one_line():
    assert str(runtime.resolve_device("cpu")) == "cpu"
    with pytest.raises(CrossdiffError, match="unknown device 'gpu7'"):
        runtime.resolve_device("gpu7")
