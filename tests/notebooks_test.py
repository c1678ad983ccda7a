"""Every notebook executes top to bottom (CPU here, GPU unchanged)."""

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted(
  (pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb")
)


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute()  # raises CellExecutionError on any failing cell
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.output_type == "error"
  ]
  assert not errors
