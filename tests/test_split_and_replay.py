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
    sim = _sim(tiny_bundle, tmp_path, 2, build_strategy("splitnn"), n_sites=2, latents_unprotected=True)
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
        sim = _sim(tiny_bundle, tmp_path, 1, build_strategy("splitnn"), n_sites=2, latents_unprotected=True)
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
                             progress=False, strategy=build_strategy("splitnn"), latents_unprotected=True)  # fmt: skip
    with pytest.raises(PrivacyConfigError, match="cut-layer features"):
        sim.setup()
    plain = _split(BundleSpec(BUNDLE_DIR, ("train.json",), {"dataset_dir": str(tiny_data), "batch_size": 4}), 2)
    sim = FederatedSimulator(BundleSpec(BUNDLE_DIR, ("train.json",), {"dataset_dir": str(tiny_data), "batch_size": 4}),
                             plain.train, plain.val, 1, LocalWork(epochs=1), tmp_path / "b", progress=False,
                             strategy=build_strategy("splitnn"))  # fmt: skip
    with pytest.raises(PrivacyConfigError, match="--latents-unprotected"):  # the features leave unprotected
        sim.setup()


def test_export_nvflare_refuses_splitnn_in_one_line(tmp_path, capsys):
    assert main(["export-nvflare", str(BUNDLE_DIR), "--strategy", "splitnn", "--latents-unprotected", "--output",
                 str(tmp_path / "j")]) == 2  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------- hostile input
def test_the_split_server_answers_anything_odd_with_an_update_error(tiny_bundle, tmp_path):
    from monai_fedpriv.errors import UpdateError
    from monai_fedpriv.fl.codec import encode
    from monai_fedpriv.fl.messages import Activations

    sim = _sim(tiny_bundle, tmp_path, 1, build_strategy("splitnn"), n_sites=2, latents_unprotected=True)
    sim.setup()
    server = sim.channel.split
    server.begin("site-1", 1, sim.global_weights)
    channels = server.in_channels
    for x in (torch.zeros(2, channels, 8, 8, dtype=torch.float64), torch.zeros(2, channels + 1, 8, 8),
              torch.zeros(2, channels, 1, 1)):  # fmt: skip
        with pytest.raises(UpdateError):
            server.handle(encode(Activations("site-1", 1, 1, {"x": x}, {"train": True})))
    with pytest.raises(UpdateError, match="site"):  # another site's features while site-1 is served
        server.handle(encode(Activations("site-2", 1, 1, {"x": torch.zeros(2, channels, 8, 8)}, {"train": True})))
    ok = server.handle(encode(Activations("site-1", 1, 1, {"x": torch.zeros(2, channels, 8, 8)}, {"train": False})))
    assert len(ok) > 0


def test_the_generator_relay_keeps_the_structure_and_the_earlier_codes():
    from monai_fedpriv.fl.messages import GeneratorState
    from monai_fedpriv.generative import build_generator
    from monai_fedpriv.generative.relay import GeneratorRelay

    ref = build_generator(2, 3, seed=0)
    relay = GeneratorRelay({"site-1": 8, "site-2": 8}, 0, ref)
    good = {k: v.clone() for k, v in ref.state_dict().items()}
    codes = torch.zeros(4, 4, 4, dtype=torch.int64)
    bad = {**good, "extra": torch.zeros(1)}
    accepted, rejected = relay.screen([GeneratorState("site-1", 1, bad, codes)], ["site-1"], 1)
    assert not accepted and "structure" in rejected["site-1"]
    high = torch.full((4, 4, 4), ref.num_embeddings, dtype=torch.int64)
    accepted, rejected = relay.screen([GeneratorState("site-1", 1, good, high)], ["site-1"], 1)
    assert not accepted and "codebook" in rejected["site-1"]
    accepted, _ = relay.screen([GeneratorState("site-1", 1, good, codes)], ["site-1"], 1)
    relay.receive(accepted)
    changed = torch.cat([codes + 1, codes])
    accepted, rejected = relay.screen([GeneratorState("site-2", 2, good, changed)], ["site-2"], 2)
    assert not accepted and "earlier sites' codes" in rejected["site-2"]
    accepted, rejected = relay.screen([GeneratorState("site-2", 2, good, torch.cat([codes, codes]))], ["site-1"], 2)
    assert not accepted and "not the one site asked" in rejected["site-2"]


def test_a_hostile_first_upload_neither_sets_the_shape_nor_stops_the_round(tiny_bundle, tmp_path):
    from monai_fedpriv.fl.messages import LatentUpload

    sim = _sim(tiny_bundle, tmp_path, 3, build_strategy("fedreplay"), n_sites=2, latents_unprotected=True)
    sim.setup()
    keeper = sim.loop.server_training
    network = sim.channel.server_model.network
    from monai_fedpriv.networks.unet_cut import encoder_and_primary

    encoder, _ = encoder_and_primary(network, 1)
    with torch.no_grad():
        latents = encoder(torch.zeros(2, 1, 32, 32))
    classes = int(getattr(network, "out_channels", 4))
    honest = LatentUpload("site-2", 2, latents, torch.zeros(2, classes, 32, 32), {"labels": "onehot"})
    tiny = LatentUpload("site-1", 2, torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1), {"labels": "onehot"})
    odd = LatentUpload("site-1", 2, latents, torch.zeros(2), {"labels": "onehot"})
    for hostile in (tiny, odd):
        accepted, rejected = keeper.screen([hostile, honest], ["site-1", "site-2"], 2)
        assert accepted == [honest] and "site-1" in rejected


def test_cwt_replay_and_splitnn_refuse_privacy_claims_and_export_needs_the_opt_in(brats, tmp_path, capsys):
    base = ["--data", str(brats), "--sites", "2", "--rounds", "3", "--override", "patch_size=[32,32]"]
    flair = str(BUNDLES / "brain_tumour_2d_flair")
    for argv, words in ((["simulate", flair, *base, "--strategy", "cwt-replay", "--latents-unprotected", "--privacy",
                          "medium", "--output", str(tmp_path / "a")], "drop --privacy"),
                        (["export-nvflare", flair, *base, "--strategy", "cwt-replay", "--output", str(tmp_path / "j")],
                         "--latents-unprotected"),
                        (["export-nvflare", flair, *base, "--strategy", "fedreplay", "--output", str(tmp_path / "k")],
                         "--latents-unprotected")):  # fmt: skip
        assert main(argv) == 2
        assert words in capsys.readouterr().err


def test_a_generator_visit_nothing_covers_is_refused_before_it_trains(monkeypatch):
    from types import SimpleNamespace

    import monai_fedpriv.generative.site as gsite
    from monai_fedpriv.fl.instruction import RoundInstruction
    from monai_fedpriv.fl.replay.upload import upload_message
    from monai_fedpriv.fl.update import GlobalModel
    from monai_fedpriv.privacy.filters import FilterChain

    monkeypatch.setattr(gsite, "generator_visit", lambda *a, **k: pytest.fail("trained without the opt-in"))
    site = SimpleNamespace(name="site-1", sync=SimpleNamespace(chain=FilterChain()))
    model = GlobalModel(0, {}, instructions={"site-1": RoundInstruction(phase="generator")})
    with pytest.raises(PrivacyConfigError, match="--latents-unprotected"):
        upload_message(site, model, 1, 0, unprotected=False)
