"""The Colab notebooks run top to bottom on the CPU with the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", xla_flags())  # one CPU device, as a Colab CPU runtime
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError naming the cell that failed
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # Top to bottom: every code cell ran, in order, and printed or showed something
    # where it is meant to (a cell's last output is never an error).
    assert code and [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert sum(bool(cell.outputs) for cell in code) >= len(code) // 2


def test_notebooks_are_committed_without_outputs():
    names = {p.name for p in NOTEBOOKS.glob("*.ipynb")}
    assert names == {"quickstart.ipynb", "convert_and_generate.ipynb", "finetune_lora.ipynb"}
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), path
        assert "colab.research.google.com" in notebook.cells[0].source, path
