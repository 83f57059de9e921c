"""The example notebook runs end to end: examples/notebooks/finetune_and_compare.ipynb executed with nbclient in a
kernel on this interpreter, its `parameters` cell replaced by tiny settings (the tiny random model, a few steps), in
a fresh workspace; then its results are checked from the outside (the registry, the outputs), so it cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebooks" / "finetune_and_compare.ipynb"
KERNEL = "tuneloop-test-venv"
CELL_TIMEOUT_S = 180
# What the notebook holds once it ran, printed as JSON by a cell the test appends.
PROBE = """
import json, sys
print("PROBE " + json.dumps({
    "python": sys.executable,
    "run_id": result.run_id,
    "mlflow_run_id": result.mlflow_run_id,
    "steps": result.steps,
    "labels": list(report.metrics),
    "version": version.version,
    "model_ref": model_ref,
    "answers": answers,
}))
"""


def tiny_parameters(model: Path, workspace: Path) -> dict[str, Any]:
    return {
        "BASE_MODEL": str(model),
        "NUM_ROWS": 80,
        "MAX_SEQ_LEN": 512,
        "MAX_STEPS": 6,
        "EVAL_EVERY": 3,
        "EVAL_ROWS": 4,
        "MAX_NEW_TOKENS": 12,
        "MIN_EXACT_MATCH": 0.0,  # passes, so the promote branch runs too
        "EVAL_ENGINE": "inprocess",
        "WORKSPACE": str(workspace),
    }


def with_parameters(notebook: Any, values: dict[str, Any]) -> None:
    """Replace the cell tagged `parameters` by `values`; every name must already be a parameter of the notebook."""
    (cell,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    defined = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line and line[0].isupper()}
    assert set(values) <= defined, f"not parameters of the notebook: {set(values) - defined}"
    cell.source = "\n".join(f"{name} = {value!r}" for name, value in values.items())


def write_kernel_spec(folder: Path) -> None:
    """A kernel on exactly this interpreter, whatever kernels the user's Jupyter folders hold ($JUPYTER_PATH is
    searched first)."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))


def outputs_of(cell: Any, kind: str) -> list[str]:
    """The texts (stream) or MIME payloads (`image/png`, `text/plain`, ...) a cell produced."""
    if kind == "stream":
        return [output["text"] for output in cell.get("outputs", []) if output["output_type"] == "stream"]
    return [output["data"][kind] for output in cell.get("outputs", []) if kind in output.get("data", {})]


def test_notebook_is_committed_without_outputs() -> None:
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_notebook_walks_the_loop(
    tmp_path: Path, tiny_model_dir: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbformat
    from nbclient import NotebookClient

    from tuneloop.config import LoopConfig
    from tuneloop.registry.store import Registry
    from tuneloop.workspace import Workspace

    write_kernel_spec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # as a Jupyter front end starts a kernel: plots go inline
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with_parameters(notebook, tiny_parameters(tiny_model_dir, workspace))
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))

    client = NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working folder
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors, errors
    (probe_text,) = outputs_of(notebook.cells[-1], "stream")
    probe = json.loads(probe_text.removeprefix("PROBE "))
    assert Path(probe["python"]).resolve() == Path(sys.executable).resolve()
    assert probe["steps"] == 6
    assert probe["labels"] == ["tuned", "base"]
    assert probe["model_ref"] == "notebook-extractor@champion"  # registered, gate passed, promoted
    assert set(probe["answers"]) == {"base", "fine-tuned"}
    # The tiny random model may well answer with blank lines; what counts is that the gateway answered.
    assert all(isinstance(answer, str) and answer for answer in probe["answers"].values()), probe["answers"]

    printed = "".join(text for cell in notebook.cells for text in outputs_of(cell, "stream"))
    assert f"MLflow run id: {probe['mlflow_run_id']}" in printed
    assert str(Workspace(workspace).mlflow_db) in printed  # where the store is
    plots = [png for cell in notebook.cells for png in outputs_of(cell, "image/png")]
    assert len(plots) == 1 and len(plots[0]) > 1000

    # The registry the notebook wrote, read from outside the kernel.
    registry = Registry(LoopConfig.model_validate({"project": {"name": "notebook"}}), Workspace(workspace))
    champion = registry.get("notebook-extractor@champion")
    assert champion.version == probe["version"] >= 1 and champion.run_id == probe["run_id"]
