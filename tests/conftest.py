"""The suite compiles with XLA:CPU's fast settings, set before JAX starts its backend.

Most of the suite's time is XLA compiling small programs, not running them: optimisation level 0
with the older loop emitters compiles them 3-5x faster (the whole suite in 60% of the time).
Assertions compare two results of the same settings, or a result with numpy within a
tolerance; the processes the tests launch (launch/train.py, benchmarks) inherit the settings
through XLA_FLAGS. An `XLA_FLAGS` of your own that names an optimisation level is left as it is.

A few claims hold bit for bit between two different programs only as XLA compiles them by
default (no compression equals top-k of everything: the extra ops change how the rest of the
round is fused, and the older emitters round a sum differently). Such a test is marked
`default_xla`: it runs again in a child process under XLA's default settings, and its result
is that run's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
CHILD = "FEDJAX_CV_TEST_DEFAULT_XLA"  # set in the child that runs a `default_xla` test

if not os.environ.get(CHILD) and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE]).strip()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "default_xla: runs in a child process under XLA's default compiler settings"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("default_xla") is None or os.environ.get(CHILD):
        return None
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), **{CHILD: "1"})
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", pyfuncitem.nodeid]
    done = subprocess.run(
        command, cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:  # exit code 5 (the test not found) fails too
        pytest.fail(
            f"under XLA's default settings (a child process):\n{done.stdout[-4000:]}",
            pytrace=False,
        )
    return True
