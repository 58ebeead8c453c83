"""Every notebook runs top to bottom without an error, and is stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The kernel's temporary folders go under tmp_path: a notebook that works in one must
    # remove it at the end (a leak here filled the CI machine's disk, ~360 MB a run).
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("VLPT_NOTEBOOK_DIR", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,  # per cell
        kernel_name="python3",  # jupyter_client runs it with this interpreter (the venv's)
        resources={"metadata": {"path": str(path.parent)}},  # the notebook's folder as cwd
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    left = sorted(p.name for p in tmp_path.glob("vlpt-*"))
    assert not left, f"{path.name} left its working folders behind: {left}"
