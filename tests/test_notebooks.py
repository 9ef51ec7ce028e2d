"""Every notebook runs top to bottom in a real Jupyter kernel on the shipped model, and the committed
notebooks carry no outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_the_four_notebooks():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart",
        "02_interactive_patching",
        "03_attention_and_importance",
        "04_sae_features",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Every figure cell produced a plotly figure.
    figures = [
        o
        for o in outputs
        if o.output_type in ("display_data", "execute_result") and "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    assert figures
