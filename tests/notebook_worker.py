"""Runs every notebook top to bottom with nbclient for `test_notebooks.py`, in a
subprocess that conftest.py starts beside the other tests (one CPU device, as a
Colab CPU runtime).

    python -m tests.notebook_worker  ->  one JSON line: {notebook: error or null}
"""

from __future__ import annotations

import json
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run(path: Path) -> str | None:
    """None when every cell ran without an error output; else what failed."""
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        return str(error)[-3000:]  # names the cell that failed and its traceback
    errors = [
        f"{output.ename}: {output.evalue}"
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    return "; ".join(errors) or None


if __name__ == "__main__":
    print(json.dumps({p.name: run(p) for p in sorted(NOTEBOOKS.glob("*.ipynb"))}))
