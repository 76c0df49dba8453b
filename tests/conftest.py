"""Shared fixtures: a tiny copy of the default data set and the default bundle shrunk to run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_fedpriv.bundle.loader import BundleSpec

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bundles" / "brain_tissue_2d"


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _own_ledger_store(tmp_path_factory, monkeypatch):
    """Every test spends epsilon into a ledger store of its own (never the user's ~/.monai_fedpriv/ledgers), so
    one test's runs never carry another's."""
    monkeypatch.setenv("MONAI_FEDPRIV_LEDGER_DIR", str(tmp_path_factory.mktemp("ledgers")))
    yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from monai_fedpriv.data.brain_tissue import build_brain_tissue_2d

    return build_brain_tissue_2d(
        tmp_path_factory.mktemp("tiny_data"), n_sites=2, cases_per_site=6, val_per_site=2, image_size=32, seed=3
    )


def tiny_overrides(data_dir: Path) -> dict:
    return {
        "dataset_dir": str(data_dir),
        "network_def#channels": [4, 8],
        "network_def#strides": [2],
        "batch_size": 4,
    }


@pytest.fixture()
def tiny_bundle(tiny_data) -> BundleSpec:
    return BundleSpec(BUNDLE_DIR, ("train.json",), tiny_overrides(tiny_data))


def assert_same_run(full: dict, resumed: dict, full_dir: Path, resumed_dir: Path) -> None:
    """A resumed run ended with bit-identical global weights and the same per-round metrics (timings aside)."""
    a = torch.load(full_dir / "models" / "model.pt")
    b = torch.load(resumed_dir / "models" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [{**r, "seconds": 0} for r in full["rounds"]] == [{**r, "seconds": 0} for r in resumed["rounds"]]


# the default bundle shrunk for jobs (NVIDIA FLARE tests): a 4-8 channel U-Net, batch 4
TINY_JOB = {"network_def#channels": [4, 8], "network_def#strides": [2], "batch_size": 4, "learning_rate": 0.01}


def write_tiny_bundle(root: Path, data_dir: Path) -> Path:
    """A bundle folder at ``root``: the default bundle's train.json and metadata.json, plus ``tiny.json`` pointing at
    ``data_dir`` with the :data:`TINY_JOB` settings (the package's shared overrides are found by name)."""
    (root / "configs").mkdir(parents=True)
    for f in ("train.json", "metadata.json"):
        (root / "configs" / f).write_text((BUNDLE_DIR / "configs" / f).read_text())
    (root / "configs" / "tiny.json").write_text(json.dumps({**TINY_JOB, "dataset_dir": str(data_dir)}))
    return root

