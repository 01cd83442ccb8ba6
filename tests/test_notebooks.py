"""The notebooks in notebooks/ run from top to bottom, in their small settings.

Each executes in a fresh python3 kernel (nbclient, the ipykernel of this environment) with
FEDJAX_CV_NOTEBOOK_QUICK=1, which its parameters cell reads; the kernel inherits this process's
environment, XLA's fast compile flags included (tests/conftest.py). A failing cell fails the
test with that cell's error. The notebooks are kept without outputs.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = (
    "compose_algorithms.ipynb",
    "write_an_algorithm.ipynb",
    "segmentation_and_detection.ipynb",
    "partitions.ipynb",
)
CELL_TIMEOUT_S = 300


def test_every_notebook_is_tested_and_kept_without_outputs():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        assert notebook.cells[0].cell_type == "markdown", name
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (name, cell.source)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("FEDJAX_CV_NOTEBOOK_QUICK", "1")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{name}: {error}", pytrace=False)
    pictures = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert pictures, f"{name} drew no figure"
