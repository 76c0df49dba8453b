"""The walkthrough notebooks in ``notebooks/`` run top to bottom on the embedded default data.

``attack_audit.ipynb`` (about a minute on 2 CPU cores) runs in every test run. ``federated_simulation.ipynb`` and
``privacy_budget.ipynb`` take 1-2 minutes each and run with ``MONAI_FEDPRIV_TEST_NOTEBOOKS=all``, which keeps this file
within about 3 minutes by default. Every notebook must be stored without outputs.

The kernel is this interpreter: a kernel spec written to a temporary ``JUPYTER_PATH`` runs ``sys.executable -m
ipykernel_launcher``, so a ``python3`` kernel registered elsewhere (another virtual environment) is never used. The
notebooks write under ``MONAI_FEDPRIV_NOTEBOOK_OUTPUT`` (here a temporary folder) and read the default data set
(built on first use, a few seconds).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

_MISSING = "executing the notebooks needs nbformat, nbclient and ipykernel (pip install -e '.[dev]')"
nbformat = pytest.importorskip("nbformat", reason=_MISSING)
nbclient = pytest.importorskip("nbclient", reason=_MISSING)
pytest.importorskip("ipykernel", reason=_MISSING)
pytest.importorskip("nilearn", reason="the notebooks build the default data set from nilearn's templates")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "monai-fedpriv-tests"
CELL_TIMEOUT_S = 600  # per cell; a whole notebook takes 1-2 minutes on 2 cores
ALL = os.environ.get("MONAI_FEDPRIV_TEST_NOTEBOOKS", "").lower() == "all"
opt_in = pytest.mark.skipif(not ALL, reason="1-2 minutes each: set MONAI_FEDPRIV_TEST_NOTEBOOKS=all to run them")
TESTED = {"attack_audit", "federated_simulation", "privacy_budget"}


def run_notebook(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Execute ``notebooks/NAME.ipynb`` in a fresh kernel of this interpreter; returns its output folder."""
    kernels = tmp_path / "jupyter" / "kernels" / KERNEL
    kernels.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "monai-fedpriv tests",
        "language": "python",
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MONAI_FEDPRIV_NOTEBOOK_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets the debugger's frozen-modules warning
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    return tmp_path / "out" / name


def test_notebooks_are_stored_without_outputs_and_all_tested():
    names = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    assert names == TESTED, f"notebooks without a test (or tests without a notebook): {names ^ TESTED}"
    for name in sorted(names):
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, name
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name}.ipynb has outputs: clear them"


@pytest.mark.slow
def test_attack_audit_notebook(tmp_path, monkeypatch):
    out = run_notebook("attack_audit", tmp_path, monkeypatch)
    records = {d.name: json.loads((d / "attack.json").read_text()) for d in out.iterdir() if d.name != "figures"}
    assert set(records) == {"none", "low", "medium", "high", "none_mask_unknown"}
    clear, high = records["none"], records["high"]
    assert clear["epsilon"] is None and clear["ssim"] > clear["baselines"]["mask"]["ssim"]
    assert high["epsilon"] is not None and high["ssim"] < high["baselines"]["mask"]["ssim"]
    assert (out / "figures" / "scores.png").stat().st_size > 0


@pytest.mark.slow
@opt_in
def test_federated_simulation_notebook(tmp_path, monkeypatch):
    out = run_notebook("federated_simulation", tmp_path, monkeypatch)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["rounds_completed"] == 8
    assert set(metrics["baselines"]) == {"centralised", "local_only"}
    assert (out / "report.md").is_file() and (out / "figures" / "segmentations.png").is_file()


@pytest.mark.slow
@opt_in
def test_privacy_budget_notebook(tmp_path, monkeypatch):
    out = run_notebook("privacy_budget", tmp_path, monkeypatch)

    def last(run: str) -> dict:
        return json.loads((out / run / "metrics.json").read_text())["rounds"][-1]

    medium, prv = last("medium")["sites"]["site-1"]["privacy"], last("medium_prv")["sites"]["site-1"]["privacy"]
    assert medium["exhausted"] and medium["epsilon"] <= medium["budget"] and medium["accountant"] == "rdp"
    assert prv["exhausted"] and prv["accountant"] == "prv" and prv["steps"] > medium["steps"]
    assert last("medium_eps5")["global"]["privacy"]["epsilon"] <= 5.0
    assert last("no_privacy")["global"]["dice"] > last("medium")["global"]["dice"]
