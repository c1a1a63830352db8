"""examples/analysis.ipynb runs top to bottom against two small real runs, so its API cannot rot."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from occbench.data import open_dataset
from occbench.engine import run_protocol
from occbench.zoo import load_model

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "analysis.ipynb"


def test_analysis_notebook_executes(tmp_path, monkeypatch):
    model = load_model("pare-demo", device="cpu")
    dataset = open_dataset("demo")
    run_a = run_protocol(model, dataset, "occsens40", tmp_path / "a", limit=2, progress=False, quiet=True)
    run_b = run_protocol(model, dataset, "advocc80", tmp_path / "b", limit=2, max_windows=16, progress=False,
                         quiet=True)
    monkeypatch.setenv("RUN_A", str(run_a))
    monkeypatch.setenv("RUN_B", str(run_b))
    monkeypatch.setenv("PYOPENGL_PLATFORM", "egl")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "pare-demo | occsens40 | demo" in outputs
    assert "FLAG: protocols differ" in outputs               # the comparison refuses to mix silently
    assert "\\begin{tabular}" in outputs and "| model |" in outputs
    assert (tmp_path / "sensitivity_mesh.png").is_file()
    # the bring-your-own-model section: an inline wrap_model model run and compared with pare-demo
    assert "my-tiny-net | occsens40 | demo | 2 samples, 0 failed" in outputs
    assert "| my-tiny-net |" in outputs and "| pare-demo |" in outputs
    assert (tmp_path / "my-tiny-net-run" / "joints.parquet").is_file()
    assert os.environ["RUN_A"] == str(run_a)
