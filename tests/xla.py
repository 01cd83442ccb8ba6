"""XLA settings the tests share: fast compilation of tiny models, and runs on 8 CPU devices."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np

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
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_results_agree(results: dict, reference: dict, atol: float = 1e-5) -> None:
    """Every path's arrays (`{path: {key: array}}`) equal `reference`'s within `atol`."""
    for path, result in results.items():
        assert set(result) == set(reference), path
        for key, value in reference.items():
            np.testing.assert_allclose(result[key], value, atol=atol, err_msg=f"{path} {key}")


def sharded_path_results(module: str, out: pathlib.Path) -> dict:
    """`module.path_results(strategy, client_mesh())` for vmap and sequential over an 8-device
    mesh, run in a process with 8 CPU devices: `{strategy: {key: array}}`."""
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from fedjax_cv.engine import client_mesh
        from {module} import path_results
        assert jax.device_count() == 8
        results = {{}}
        for strategy in ("vmap", "sequential"):
            for key, value in path_results(strategy, client_mesh()).items():
                results[f"{{strategy}}/{{key}}"] = value
        np.savez({str(out)!r}, **results)
        """
    )
    run_on_devices(script)
    flat = dict(np.load(out))
    return {
        strategy: {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(strategy + "/")}
        for strategy in ("vmap", "sequential")
    }
