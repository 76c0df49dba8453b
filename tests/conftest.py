"""Shared fixtures: a tiny copy of the default data set and the default bundle shrunk to run in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monai_fedpriv.bundle.loader import BundleSpec

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bundles" / "brain_tissue_2d"


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
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
