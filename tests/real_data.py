"""The real datasets of ../shared/data (or $FEDJAX_CV_DATA) for tests that need them.

Without a dataset such a test skips, so the project passes on a machine without the folder;
with FEDJAX_CV_REQUIRE_DATA=1 (CI, which has it) a missing dataset fails the test instead, so
a moved folder or a renamed file cannot turn the real-data tests into silent skips.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from fedjax_cv.config_base import default_data_root

DATA = pathlib.Path(default_data_root())
REQUIRE = "FEDJAX_CV_REQUIRE_DATA"


def required() -> bool:
    return os.environ.get(REQUIRE, "") == "1"


def require(relative: str | os.PathLike) -> pathlib.Path:
    """DATA / relative if it exists; otherwise skip the test, or fail it when required."""
    path = DATA / relative
    if path.exists():
        return path
    message = f"real dataset {path} not found (set FEDJAX_CV_DATA to the shared data folder)"
    if required():
        pytest.fail(f"{message}; {REQUIRE}=1 makes missing real data a failure")
    pytest.skip(message)
