"""SplitNN and CWT+Replay on the one run loop: what crosses the wire each batch (and is counted), what the server
part learns, privacy refused where nothing covers the per-batch features, the generator visiting the sites in order
and replaying its own earlier outputs, and an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.cli import main
from monai_fedpriv.data.synthetic import write_brats_folder
from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
from monai_fedpriv.fl.strategies import build_strategy
from monai_fedpriv.networks.unet_cut import server_keys, site_keys
from tests.conftest import BUNDLE_DIR
from tests.test_workflow import _sim, _split

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


# ---------------------------------------------------------------------------------------------------- SplitNN
def test_splitnn_trains_both_parts_and_counts_every_batch(tiny_bundle, tmp_path):
    sim = _sim(tiny_bundle, tmp_path, 2, build_strategy("splitnn"), n_sites=2)
    sim.setup()
    start = {k: v.clone() for k, v in sim.global_weights.items()}
    m = sim.run()
    network = sim.channel.server_model.network
    end = sim.global_weights
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved & set(server_keys(network)), "the server part did not learn"
    assert moved & set(site_keys(network)), "the sites' part did not learn"
    for r, site in zip(m["rounds"], ("site-1", "site-2"), strict=True):
        entry = r["sites"][site]
        assert list(r["sites"]) == [site]  # one site a round, in order
        steps = entry["local_steps"]
        assert entry["batch_messages"] >= 4 * steps  # features and gradients both ways, every step
        assert entry["messages"] == 2 + entry["batch_messages"]
        assert entry["bytes_sent"] > entry["batch_bytes_sent"] > 0
        assert entry["bytes_received"] > entry["batch_bytes_received"] > 0


def test_splitnn_sends_only_the_sites_part_of_the_weights(tiny_bundle, tmp_path):
    from monai_fedpriv.fl.transport import inprocess

    sent = []
    real = inprocess.encode_update

    def spy(update):
        sent.append(update)
        return real(update)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inprocess, "encode_update", spy)
        sim = _sim(tiny_bundle, tmp_path, 1, build_strategy("splitnn"), n_sites=2)
        sim.run()
    own = set(site_keys(sim.channel.server_model.network))
    (update,) = sent
    assert update.masks is not None
    assert {k for k, m in update.masks.items() if bool(m.all())} == own
    assert not any(bool(m.any()) for k, m in update.masks.items() if k not in own)


def test_splitnn_refuses_a_privacy_setting(tiny_data, tmp_path):
    from tests.test_dp_simulation import _dp_bundle

    split = _split(_dp_bundle(tiny_data), 2)
    sim = FederatedSimulator(_dp_bundle(tiny_data), split.train, split.val, 1, LocalWork(epochs=1), tmp_path,
                             progress=False, strategy=build_strategy("splitnn"))  # fmt: skip
    with pytest.raises(PrivacyConfigError, match="cut-layer features"):
        sim.setup()


def test_export_nvflare_refuses_splitnn_in_one_line(tmp_path, capsys):
    assert main(["export-nvflare", str(BUNDLE_DIR), "--strategy", "splitnn", "--output", str(tmp_path / "j")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every batch" in err[0]


# ---------------------------------------------------------------------------------------------------- CWT+Replay
@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Path:
    return write_brats_folder(tmp_path_factory.mktemp("brats") / "BraTS", 6, shape=(16, 16, 16),
                              institutions=("CBICA", "TCIA_08"))  # fmt: skip


def _cwt_replay(data: Path, out: Path, rounds: int, *extra: str) -> dict:
    argv = ["simulate", str(BUNDLES / "brain_tumour_2d_flair"), "--data", str(data), "--sites", "2", "--rounds",
            str(rounds), "--strategy", "cwt-replay", "--override", "patch_size=[32,32]", "--override", "batch_size=4",
            "--output", str(out), "--no-report", *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_cwt_replay_visits_the_sites_in_order_and_replays_the_generators_outputs(brats, tmp_path, monkeypatch):
    import monai_fedpriv.generative.site as gsite

    visits, fills = [], []
    real_visit, real_fill = gsite.generator_visit, gsite.fill_replay

    def visit(site, state, rnd, seed, epochs):
        visits.append((site.name, rnd, None if state is None else state.items))
        return real_visit(site, state, rnd, seed, epochs)

    def fill(site, mix, state, rnd, seed):
        n = real_fill(site, mix, state, rnd, seed)
        fills.append((site.name, rnd, n, state.items, len(mix), [len(g) for g in mix.replay]))
        return n

    monkeypatch.setattr(gsite, "generator_visit", visit)
    monkeypatch.setattr(gsite, "fill_replay", fill)
    m = _cwt_replay(brats, tmp_path / "run", 4, "--latents-unprotected")
    assert [(s, r) for s, r, _ in visits] == [("site-1", 1), ("site-2", 2)]
    assert visits[0][2] is None and visits[1][2] == m["upload"]["site-1"]["items"]  # site 2 got site 1's codes
    assert m["upload"]["site-2"]["items"] > m["upload"]["site-1"]["items"]  # codes accumulate
    assert all(u["kind"] == "generator" and u["protected"] is False for u in m["upload"].values())
    # the transfer rounds: one site each, its stream is its own items followed by as many replayed pairs
    assert [f[:2] for f in fills] == [("site-1", 3), ("site-2", 4)]
    for _, _, n, codes, length, groups in fills:
        assert n == min(codes, sum(groups)) and length % 2 == 0 and sum(groups) == n
    assert [list(r["sites"]) for r in m["rounds"]] == [["site-1"], ["site-2"], ["site-1"], ["site-2"]]


def test_cwt_replay_needs_the_opt_in_and_binary_masks(brats, tiny_data, tmp_path, capsys):
    argv = ["simulate", str(BUNDLES / "brain_tumour_2d_flair"), "--data", str(brats), "--sites", "2", "--rounds",
            "3", "--strategy", "cwt-replay", "--override", "patch_size=[32,32]", "--output", str(tmp_path / "a")]
    assert main(argv) != 0
    assert "--latents-unprotected" in capsys.readouterr().err
    bundle = BundleSpec(BUNDLE_DIR, ("train.json",), {"dataset_dir": str(tiny_data), "batch_size": 4})
    split = _split(bundle, 2)
    sim = FederatedSimulator(bundle, split.train, split.val, 3, LocalWork(epochs=1), tmp_path / "b", progress=False,
                             strategy=build_strategy("cwt-replay"), latents_unprotected=True)  # fmt: skip
    with pytest.raises(Exception, match="binary mask"):
        sim.setup()


def test_cwt_replay_resumes_exactly(brats, tmp_path):
    _cwt_replay(brats, tmp_path / "full", 4, "--latents-unprotected")
    _cwt_replay(brats, tmp_path / "cut", 3, "--latents-unprotected")
    _cwt_replay(brats, tmp_path / "cut", 4, "--latents-unprotected", "--resume")
    a = torch.load(tmp_path / "full" / "federated" / "models" / "model.pt")
    b = torch.load(tmp_path / "cut" / "federated" / "models" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
