"""XLA settings the tests share: fast compilation of tiny models, and runs on 8 CPU devices."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Compilation, not execution, dominates tests of tiny models: XLA:CPU spends seconds per model
# in LLVM (a random kernel per parameter shape in `init`, every conv's gradient). Optimisation
# level 0 with the older loop emitters compiles 5-15x faster; the arrays are tiny.
FAST_COMPILE = (
    {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    if jax.default_backend() == "cpu"
    else {}
)


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def run_on_devices(script: str, count: int = 8) -> subprocess.CompletedProcess:
    """Runs `script` in a new Python process with `count` CPU devices, from the repository
    root (so `tests.` imports work); fails the test when it exits non-zero."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
