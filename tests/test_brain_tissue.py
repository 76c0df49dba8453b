"""Default brain-tissue data set: builds, loads with checks, deterministic, three classes, sites differ."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from monai_fedpriv.data import (
    build_brain_tissue_2d,
    ensure_default_data,
    load_msd_datalist,
    partition_cases,
    read_image,
)
from monai_fedpriv.errors import DataError

pytest.importorskip("nilearn")

SMALL = {"n_sites": 3, "cases_per_site": 20, "val_per_site": 4, "image_size": 32, "seed": 0}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_brain_tissue_2d(tmp_path_factory.mktemp("bt") / "data", **SMALL)


@pytest.fixture(scope="module")
def cases(built):
    return load_msd_datalist(built, check=True)


def test_layout_and_types(built, cases):
    val = load_msd_datalist(built, section="validation", check=True)
    assert len(cases) == 60 and len(val) == 12
    assert {c["split"] for c in cases} == {"train"} and {c["split"] for c in val} == {"val"}
    for site in ("site-1", "site-2", "site-3"):
        assert sum(c["institution"] == site for c in cases) == 20
        assert sum(c["institution"] == site for c in val) == 4
    img, aff = read_image(cases[0]["image"])
    lab, lab_aff = read_image(cases[0]["label"])
    assert img.shape == lab.shape == (32, 32)
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    np.testing.assert_allclose(np.diag(aff)[:2], [224.0 / 32] * 2)
    np.testing.assert_array_equal(aff, lab_aff)
    info = json.loads((built / "build_info.json").read_text())
    assert {k: info["params"][k] for k in SMALL} == SMALL
    assert set(info["site_acquisition"]) == {"site-1", "site-2", "site-3"}


def test_labels_and_feature(cases):
    has_all = []
    for c in cases:
        lab, _ = read_image(c["label"])
        has_all.append(set(np.unique(lab)) == {0, 1, 2})
        wm_fraction = (lab == 2).sum() / max((lab > 0).sum(), 1)
        assert c["feature"] == pytest.approx(wm_fraction, abs=1e-5)
    assert np.mean(has_all) >= 0.9


def test_deterministic_and_reused(built, tmp_path):
    other = build_brain_tissue_2d(tmp_path / "again", **SMALL)
    for rel in ["dataset.json", "build_info.json", "imagesTr/site2_005.nii.gz", "labelsTr/site3_021.nii.gz"]:
        assert (built / rel).read_bytes() == (other / rel).read_bytes(), rel
    stamp = (other / "imagesTr" / "site1_000.nii.gz").stat().st_mtime_ns
    assert build_brain_tissue_2d(other, **SMALL) == other
    assert (other / "imagesTr" / "site1_000.nii.gz").stat().st_mtime_ns == stamp
    different = dict(SMALL, seed=1)
    with pytest.raises(DataError, match="overwrite=True"):
        build_brain_tissue_2d(other, **different)
    build_brain_tissue_2d(other, **different, overwrite=True)
    assert json.loads((other / "build_info.json").read_text())["params"]["seed"] == 1
    assert (built / "imagesTr/site1_000.nii.gz").read_bytes() != (other / "imagesTr/site1_000.nii.gz").read_bytes()


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        build_brain_tissue_2d(tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _stats(path: str, label_path: str) -> tuple[float, float, float]:
    img, _ = read_image(path)
    lab, _ = read_image(label_path)
    gm, wm = img[lab == 1].mean(), img[lab == 2].mean()
    corner = np.concatenate([img[:4, :4].ravel(), img[-4:, -4:].ravel()])
    return float(wm), float(gm / wm), float(corner.std())


def test_sites_differ_in_intensity(cases):
    stats = {
        s: np.array([_stats(c["image"], c["label"]) for c in cases if c["institution"] == s])
        for s in ("site-1", "site-2", "site-3")
    }
    names = list(stats)
    for i in range(3):
        for j in range(i + 1, 3):
            # WM level, GM/WM contrast and background noise: at least two differ strongly between any two sites.
            p = [mannwhitneyu(stats[names[i]][:, k], stats[names[j]][:, k]).pvalue for k in range(3)]
            assert sum(v < 1e-3 for v in p) >= 2, (names[i], names[j], p)


def test_skew_partitions_on_built_data(cases):
    ks = {
        s: np.mean([partition_cases(cases, 3, s, seed=q).mean_ks for q in range(4)])
        for s in ("iid", "skew-low", "skew-mid", "skew-high")
    }
    assert ks["iid"] < ks["skew-low"] < ks["skew-mid"] < ks["skew-high"]
    assert ks["skew-high"] > 0.9
    inst = partition_cases(cases, None, "institution", seed=0)
    assert inst.sizes() == {"site-1": 20, "site-2": 20, "site-3": 20}
    assert all({c["institution"] for c in v} == {k} for k, v in inst.sites.items())


def test_ensure_default_data_uses_env(monkeypatch, tmp_path):
    calls = []

    def fake_build(root, **kwargs):
        calls.append((Path(root), kwargs))
        return Path(root)

    monkeypatch.setattr("monai_fedpriv.data.brain_tissue.build_brain_tissue_2d", fake_build)
    monkeypatch.setenv("MONAI_FEDPRIV_DATA", str(tmp_path / "env"))
    assert ensure_default_data() == tmp_path / "env"
    assert ensure_default_data(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("MONAI_FEDPRIV_DATA")
    assert ensure_default_data() == Path.home() / ".cache" / "monai_fedpriv" / "brain_tissue_2d"
    assert all(kwargs == {"overwrite": False} for _, kwargs in calls)


def test_ensure_default_data_replaces_its_own_stale_build_only(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        "monai_fedpriv.data.brain_tissue.build_brain_tissue_2d",
        lambda root, **kw: calls.append(kw) or Path(root),
    )
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "build_info.json").write_text(json.dumps({"params": {"format_version": 0}}))
    ensure_default_data(stale)
    assert calls[-1] == {"overwrite": True}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    ensure_default_data(foreign)
    assert calls[-1] == {"overwrite": False}  # the builder then refuses the foreign folder


def test_missing_nilearn_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nilearn", None)
    with pytest.raises(ImportError, match="pip install nilearn"):
        ensure_default_data(tmp_path / "x")
    with pytest.raises(ImportError, match="pip install nilearn"):
        build_brain_tissue_2d(tmp_path / "y", **SMALL)


def test_default_build_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    root = build_brain_tissue_2d(tmp_path / "full")  # the default: 3 sites x (40 + 10) cases at 64x64
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0
    assert len(load_msd_datalist(root)) == 120 and len(load_msd_datalist(root, section="validation")) == 30


def test_docs_give_the_acquisition_ranges_the_code_uses():
    from pathlib import Path

    from monai_fedpriv.data.brain_tissue import ACQUISITION_RANGES

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    for name, (lo, hi) in ACQUISITION_RANGES.items():
        assert f"| `{name}` | {lo} - {hi} |" in text, name
