"""benchmarks/gpu.py at toy sizes on CPU: every row measured, the table printed.

The toy run is a smoke test of the accelerator table's code (models, dtypes, strategies, the
report); its rates are not asserted (tests never assert a time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402

STRATEGIES = ("vmap", "sequential")


def run_toy(tmp_path: Path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # One CPU device (no weak-scaling rows), compiled with the suite's settings.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--toy", f"--out={out}", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def check_report(
    report: dict, stdout: str, models: list[str], dtypes=tuple(gpu.DTYPES), strategies=STRATEGIES
) -> None:
    rows = {(r["model"], r["strategy"], r["dtype"]): r for r in report["rows"]}
    for model in models:
        for strategy in strategies:
            for dtype in dtypes:
                row = rows[(model, strategy, dtype)]
                assert row["error"] is None, row
                assert row["client_images_per_s"] > 0
                assert row["centralized_images_per_s"] > 0
                assert row["federated_over_centralized"] > 0
                line = f"| {model} | {row['image_size']} | {dtype} | {strategy} |"
                assert line in stdout
    assert report["backend"] == "cpu" and report["sizes"]["toy"]
    if "bf16" in dtypes:
        assert "bfloat16" in report["bf16"] and "bfloat16" in stdout
    # On CPU `auto` runs conv models (all of these, ViT's patch embedding included) with the
    # host loop (DESIGN.md, the engine), so the benchmark times that strategy too.
    auto = {a["model"]: a for a in report["auto"]}
    for model in models:
        assert auto[model]["auto_picks"] == "host"
        assert set(auto[model]["fastest"]) == set(dtypes)
        assert all(rows[(model, "host", dtype)]["client_images_per_s"] > 0 for dtype in dtypes)
        assert f"| {model} | host |" in stdout
    assert report["scaling"] == []  # one device


def test_toy_table_one_model(tmp_path):
    report, stdout = run_toy(tmp_path, "--models=resnet50")
    check_report(report, stdout, ["resnet50"])


@pytest.mark.slow
def test_toy_table_every_model(tmp_path):
    # Every model in bf16 (the accelerator's path no other test trains) with vmap and the host
    # loop `auto` picks on CPU; the whole matrix of strategies and dtypes is the test above's.
    report, stdout = run_toy(tmp_path, "--dtypes=bf16", "--strategies=vmap")
    check_report(report, stdout, list(gpu.BENCHMARKS), dtypes=("bf16",), strategies=("vmap",))
    assert {r["image_size"] for r in report["rows"]} == {gpu.TOY_IMAGE}


def test_unknown_model_is_refused():
    with pytest.raises(SystemExit):
        gpu.parse_args(["--models=resnet51"])


def test_scaling_devices():
    assert gpu.scaling_devices(1) == [1]
    assert gpu.scaling_devices(2) == [1, 2]
    assert gpu.scaling_devices(6) == [1, 2, 4, 6]
    assert gpu.scaling_devices(8) == [1, 2, 4, 8]
