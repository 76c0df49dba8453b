"""FedReplay (seed 004, Algorithm 2) on the run loop, in simulations of a few seconds: the round kinds in order
(encoder site, one upload, server training), what ``metrics.json`` says of each upload, a spy on every message a
site encodes (no image ever leaves a site; the latents are the encoder's output), the refusal of an upload no
mechanism covers, the Gaussian mechanism charged once within the budget (and a budget too small for the upload), and
the CLI's refusals of the FedReplay flags."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.networks.nets import UNet

import monai_fedpriv.fl.replay.upload as upload_module
import monai_fedpriv.fl.simulator.channel as channel_module
import monai_fedpriv.fl.transport.inprocess as transport_module
from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.cli import main
from monai_fedpriv.errors import FederationError, PrivacyConfigError
from monai_fedpriv.experiments import bundle_datalist, split_sites
from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
from monai_fedpriv.fl.strategies import build_strategy
from monai_fedpriv.networks.unet_cut import encoder_and_primary
from monai_fedpriv.privacy.accounting import GaussianEvent, PrivacyLedger
from monai_fedpriv.privacy.ledger_store import LedgerStore
from tests.conftest import BUNDLE_DIR, tiny_overrides, write_tiny_bundle

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SITES = ("site-1", "site-2", "site-3")
SIZES = {"site-1": 3, "site-2": 5, "site-3": 4}  # site-2 has the most cases: it trains the encoder
FLAG = "--latents-unprotected"


# ---------------------------------------------------------------------------------------------------- spies
@dataclass
class Sent:
    """One message a site encoded for the server."""

    site: str
    round: int
    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    nbytes: int


@dataclass
class Wire:
    """Everything the sites encoded (updates through the transport, uploads through the channel) and what the
    FedReplay encoder saw and produced at each site."""

    sent: list[Sent] = field(default_factory=list)
    encoder_in: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    encoder_out: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    uploading: list[str] = field(default_factory=list)

    def of_round(self, rnd: int) -> list[Sent]:
        return [s for s in self.sent if s.round == rnd]


def _tensors(message: Any) -> dict[str, torch.Tensor]:
    if message.kind == "update":
        state = message.optimizer_state or {}
        return {f"delta.{k}": v.detach().clone() for k, v in message.delta.items()} | {
            f"optimizer_state.{k}": v.detach().clone() for k, v in state.items()
        }
    return {f"{name}.{k}": v.detach().clone() for name, ts in message.fields().items() for k, v in ts.items()}


def install_spies(mp: pytest.MonkeyPatch) -> Wire:
    """Wrap the codec's encoders where the simulator's sites use them, and the FedReplay encoder of each upload."""
    wire = Wire()
    encode, encode_update = channel_module.encode, transport_module.encode_update
    site_upload, cut = upload_module.site_upload, upload_module.encoder_and_primary

    def record(message: Any, data: bytes) -> bytes:
        wire.sent.append(Sent(message.site, message.round, message.kind, _tensors(message), dict(message.meta),
                              len(data)))  # fmt: skip
        return data

    def spy_upload(site, *args, **kwargs):
        wire.uploading.append(site.name)
        try:
            return site_upload(site, *args, **kwargs)
        finally:
            wire.uploading.pop()

    def spy_cut(network, cut_block):
        encoder, primary = cut(network, cut_block)
        name = wire.uploading[-1]

        def hook(module, inputs, output):
            wire.encoder_in.setdefault(name, []).append(inputs[0].detach().clone())
            wire.encoder_out.setdefault(name, []).append(output.detach().clone())

        encoder.register_forward_hook(hook)
        return encoder, primary

    mp.setattr(channel_module, "encode", lambda m: record(m, encode(m)))
    mp.setattr(transport_module, "encode_update", lambda u: record(u, encode_update(u)))
    mp.setattr(upload_module, "site_upload", spy_upload)
    mp.setattr(upload_module, "encoder_and_primary", spy_cut)
    return wire


# ---------------------------------------------------------------------------------------------------- runs
def three_sites(bundle: BundleSpec) -> tuple[dict[str, list], dict[str, list]]:
    """The tiny data's 12 training cases on three sites of 3, 5 and 4 cases (validation as split)."""
    split = split_sites(bundle_datalist(bundle), 3, "iid", seed=0)
    cases = [c for site in split.train.values() for c in site]
    assert len(cases) == sum(SIZES.values())
    train, start = {}, 0
    for name in SITES:
        train[name], start = cases[start : start + SIZES[name]], start + SIZES[name]
    return train, split.val


def simulator(bundle: BundleSpec, out: Path, rounds: int = 4, **kw: Any) -> FederatedSimulator:
    train, val = three_sites(bundle)
    return FederatedSimulator(bundle, train, val, rounds, LocalWork(epochs=1), out, progress=False,
                              strategy=build_strategy("fedreplay"), seed=0, **kw)  # fmt: skip


@dataclass
class Run:
    metrics: dict[str, Any]
    wire: Wire
    sim: FederatedSimulator
    weights: dict[int, dict[str, torch.Tensor]]
    train: dict[str, list]


@pytest.fixture(scope="module")
def unprotected_run(tiny_data, tmp_path_factory) -> Run:
    """One FedReplay run (encoder 1 + upload 1 + server 2 rounds) with ``latents_unprotected``, every message spied
    on and the global weights kept after every round."""
    torch.set_num_threads(1)
    bundle = BundleSpec(BUNDLE_DIR, ("train.json",), tiny_overrides(tiny_data))
    weights: dict[int, dict[str, torch.Tensor]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MONAI_FEDPRIV_LEDGER_DIR", str(tmp_path_factory.mktemp("ledgers")))
        wire = install_spies(mp)
        sim: FederatedSimulator | None = None

        def keep(metrics: dict[str, Any]) -> None:
            assert sim is not None
            weights[len(metrics["rounds"])] = {k: v.detach().clone() for k, v in sim.global_weights.items()}

        sim = simulator(bundle, tmp_path_factory.mktemp("fedreplay"), latents_unprotected=True, on_round=keep)
        metrics = sim.run()
    return Run(metrics, wire, sim, weights, three_sites(bundle)[0])


# ---------------------------------------------------------------------------------------------------- the rounds
def test_fedreplay_trains_the_encoder_at_one_site_uploads_once_and_trains_at_the_server(unprotected_run):
    m, run = unprotected_run.metrics, unprotected_run
    assert isinstance(run.sim.sites["site-1"].network, UNet)  # the cut needs a MONAI UNet: the tiny bundle's is one
    assert m["strategy"] == {"name": "fedreplay", "cut_block": 1, "encoder_site": "site-2", "encoder_rounds": 1,
                             "server_epochs": 1}  # fmt: skip
    rounds = m["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and m["final"]["rounds_completed"] == 4
    # round 1: only the site with the most cases trains the whole network (its full batches: 5 cases, batch 4)
    assert list(rounds[0]["sites"]) == ["site-2"]
    first = rounds[0]["sites"]["site-2"]
    assert first["n_samples"] == 5 and first["local_steps"] == 1 and "upload" not in first
    assert "server" not in rounds[0]
    # round 2: every site uploads, once, and the server accepts each
    assert list(rounds[1]["sites"]) == list(SITES) and "server" not in rounds[1]
    for name in SITES:
        entry = rounds[1]["sites"][name]
        assert entry["accepted"] is True and entry["upload"] == m["upload"][name]
        assert "local_steps" not in entry and "loss" not in entry  # no training at the sites
    # rounds 3 and 4: the server trains on the pooled latents, no site is asked anything
    for r in rounds[2:]:
        assert r["sites"] == {}
        assert r["server"]["phase"] == "server" and r["server"]["steps"] > 0
        assert r["server"]["items"] == sum(SIZES.values()) and r["server"]["epochs"] == 1
        assert math.isfinite(r["server"]["loss"])
    # metrics.json's upload facts, one per site
    assert set(m["upload"]) == set(SITES)
    for name in SITES:
        facts = m["upload"][name]
        assert {"kind", "items", "bytes", "protected", "privacy"} <= set(facts)
        assert facts["kind"] == "latents" and facts["round"] == 2
        assert facts["items"] == SIZES[name]  # one 2D item per case
        assert facts["item_shape"] == [4, 16, 16]  # channels[0] = 4 features at half the 32x32 patch
        assert facts["bytes"] > 0 and facts["protected"] is False and facts["privacy"] is None
    assert "latents_unprotected" in m and m["config"]["latents_unprotected"] is True


def test_the_global_model_changes_only_where_each_phase_trains(unprotected_run):
    w = unprotected_run.weights
    network = unprotected_run.sim.sites["site-1"].network
    encoder, _ = encoder_and_primary(network, 1)
    encoder_ids = {id(p) for p in encoder.parameters()}
    encoder_keys = {n for n, p in network.named_parameters() if id(p) in encoder_ids}
    assert encoder_keys and encoder_keys < set(w[1])
    assert all(torch.equal(w[2][k], w[1][k]) for k in w[1])  # an upload round leaves the global model as it was
    for rnd in (3, 4):
        changed = {k for k in w[rnd] if not torch.equal(w[rnd][k], w[rnd - 1][k])}
        assert changed and not changed & encoder_keys, (rnd, changed & encoder_keys)  # the primary model only


# ---------------------------------------------------------------------------------------------------- what leaves
def test_no_site_sends_its_images_and_the_latents_are_the_encoders_output(unprotected_run):
    run = unprotected_run
    assert [s.kind for s in run.wire.of_round(1)] == ["update"] and run.wire.of_round(1)[0].site == "site-2"
    upload_round = run.wire.of_round(2)
    assert sorted(s.site for s in upload_round) == list(SITES)  # one message per site
    assert all(s.kind == "latents" for s in upload_round)  # and no weight update in the upload round
    assert not [s for s in run.wire.sent if s.round > 2]  # nothing at all during the server's rounds
    for s in upload_round:
        images = torch.cat(run.wire.encoder_in[s.site])
        encoded = torch.cat(run.wire.encoder_out[s.site])
        n = SIZES[s.site]
        assert images.shape == (n, 1, 32, 32) and encoded.shape == (n, 4, 16, 16)
        assert set(s.tensors) == {"latents.latents", "labels.labels"}
        latents, labels = s.tensors["latents.latents"], s.tensors["labels.labels"]
        assert torch.equal(latents, encoded)  # unprotected: exactly what the encoder produced
        assert s.meta["items_per_unit"] == 1 and s.meta["protected"] is False
        # the one other tensor that may have the images' shape is the label map (class indices), never the images
        image_shaped = [k for k, t in s.tensors.items() if tuple(t.shape) == tuple(images.shape)]
        assert set(image_shaped) <= {"labels.labels"}, image_shaped
        assert labels.shape[0] == n and set(labels.unique().tolist()) <= {0.0, 1.0, 2.0}
        for key, t in s.tensors.items():
            assert t.shape != images.shape or not torch.allclose(t.float(), images.float(), atol=1e-3), key


def test_each_upload_reports_the_bytes_that_crossed_the_wire(unprotected_run):
    """``metrics.json``'s ``upload[site]["bytes"]`` is the encoded message's length (what was sent), as a round's
    ``bytes_sent`` is for updates; and the upload counts as a message the site sent."""
    m, wire = unprotected_run.metrics, unprotected_run.wire
    for s in wire.of_round(2):
        assert m["upload"][s.site]["bytes"] == s.nbytes, (s.site, m["upload"][s.site]["bytes"], s.nbytes)
        assert m["rounds"][1]["sites"][s.site]["messages"] == 2  # it received the model and sent its upload


def test_the_server_trains_on_the_labels_the_sites_sent(unprotected_run):
    """The pool the server trains on holds each site's labels as sent: the bundle's labels are class indices
    {0, 1, 2} (``DiceCELoss(to_onehot_y=True)`` over 3 classes); thresholding them at 0.5 turns class 2 into 1."""
    pool = unprotected_run.sim.loop.server_training.pool
    sent = {s.site: classes(s.tensors["labels.labels"]) for s in unprotected_run.wire.of_round(2)}
    assert pool.sites == list(SITES)
    assert 2 in torch.cat(list(sent.values())).unique().tolist()  # the data has class 2
    for name, labels in zip(pool.sites, pool.labels, strict=True):
        got = classes(labels)
        assert torch.equal(got, sent[name]), (name, got.unique().tolist(), sent[name].unique().tolist())


def classes(labels: torch.Tensor) -> torch.Tensor:
    """The class of each pixel of ``[N, C, H, W]`` labels: their values for one channel of class indices, the
    argmax over channels for one-hot masks (so the check holds whichever form the sites send and the pool keeps)."""
    return labels[:, 0].round().long() if labels.shape[1] == 1 else labels.argmax(dim=1)


# ---------------------------------------------------------------------------------------------------- refusals
def test_an_upload_nothing_protects_is_refused_before_any_round(tiny_bundle, tmp_path):
    sim = simulator(tiny_bundle, tmp_path / "run")
    with pytest.raises(PrivacyConfigError, match=FLAG) as info:
        sim.run()
    assert "latents.labels" in str(info.value) and "latents.latents" in str(info.value)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert sim.history == []


def test_the_cli_refuses_fedreplay_without_a_mechanism_or_the_flag(tiny_data, tmp_path, capsys):
    bundle = write_tiny_bundle(tmp_path / "bundle", tiny_data)
    out = tmp_path / "out"
    argv = ["simulate", str(bundle), "--config-files", "train.json", "tiny.json", "--sites", "3", "--rounds", "4",
            "--partition", "iid", "--seed", "0", "--no-report", "--output", str(out),
            "--strategy", "fedreplay"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert FLAG in err and "latents.latents" in err
    assert not (out / "federated" / "metrics.json").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--strategy", "fedavg", FLAG], f"{FLAG} / --latent-noise-multiplier: --strategy fedavg sends no"),
        (["--strategy", "fedreplay", "--latent-noise-multiplier", "1"], "--latent-noise-multiplier needs "
                                                                         "--epsilon-budget"),
        (["--strategy", "fedreplay", "--rounds", "2", FLAG], "--strategy fedreplay needs at least 3 rounds"),
        (["--strategy", "fedreplay", "--encoder-rounds", "2", "--rounds", "3", FLAG], "needs at least 4 rounds"),
        (["--strategy", "fedreplay", FLAG, "--latent-noise-multiplier", "1", "--epsilon-budget", "50"],
         "exclude each other"),
        (["--strategy", "fedreplay", "--latent-clip", "2", FLAG], "--latent-clip"),
        (["--strategy", "fedreplay", "--latent-noise-multiplier", "0", "--epsilon-budget", "50"],
         "--latent-noise-multiplier"),
    ],
    ids=["fedavg", "no-budget", "two-rounds", "encoder-rounds", "both", "clip-alone", "zero-noise"],
)  # fmt: skip
def test_the_cli_refuses_misused_fedreplay_flags_naming_them(tiny_data, tmp_path, capsys, extra, words):
    bundle = write_tiny_bundle(tmp_path / "bundle", tiny_data)
    argv = ["simulate", str(bundle), "--config-files", "train.json", "tiny.json", "--sites", "3", "--rounds", "4",
            "--partition", "iid", "--no-report", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv + extra) == 2  # (a later --rounds replaces the 4)
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------------- the mechanism
@pytest.fixture(scope="module")
def brats_data(tmp_path_factory) -> Path:
    from monai_fedpriv.data.synthetic import write_brats_folder

    return write_brats_folder(tmp_path_factory.mktemp("brats") / "BraTS", 6, shape=(16, 16, 16), seed=0,
                              institutions=("CBICA", "TCIA_08"))  # fmt: skip


def flair_fedreplay(data: Path, out: Path, *extra: str) -> int:
    """FedReplay on the FLAIR bundle (binary whole-tumour masks, a MONAI UNet, 4 slices per volume) at patch 32."""
    return main(["simulate", str(BUNDLES / "brain_tumour_2d_flair"), "--data", str(data), "--sites", "3",
                 "--rounds", "4", "--partition", "iid", "--seed", "0", "--output", str(out), "--override",
                 "patch_size=[32,32]", "--override", "batch_size=4", "--no-report", "--strategy", "fedreplay",
                 *extra])  # fmt: skip


def store_records() -> dict[str, dict[str, Any]]:
    return {r["site"]: r for r in LedgerStore(Path(os.environ["MONAI_FEDPRIV_LEDGER_DIR"])).records()}


def test_the_mechanism_protects_each_upload_and_charges_it_once(brats_data, tmp_path, monkeypatch):
    wire = install_spies(monkeypatch)
    out = tmp_path / "run"
    assert flair_fedreplay(brats_data, out, "--epsilon-budget", "100", "--latent-noise-multiplier", "1") == 0
    m = json.loads((out / "metrics.json").read_text())
    k = 4  # samples_per_volume: the most items one case gave
    z = 1.0 / math.sqrt(5 * k)
    eps = PrivacyLedger().epsilon_with([GaussianEvent(z)], 1e-5)
    assert eps == pytest.approx(30.1266, abs=1e-4)
    assert set(m["upload"]) == set(SITES)
    for name in SITES:
        facts = m["upload"][name]
        assert facts["protected"] is True and facts["kind"] == "latents" and facts["items"] == 4
        privacy = facts["privacy"]
        assert privacy["mechanism"] == "latent_gaussian" and privacy["items_per_unit"] == k
        assert privacy["recorded_noise_multiplier"] == pytest.approx(z)
        assert privacy["epsilon"] == pytest.approx(eps) and privacy["budget"] == 100.0
        assert m["rounds"][1]["sites"][name]["privacy"]["epsilon"] == pytest.approx(eps)
    assert all(r["sites"] == {} for r in m["rounds"][2:])  # no site is asked (or charged) in the server's rounds
    # each site's ledger holds the one release, nothing else, for the whole run
    records = store_records()
    assert set(records) == set(SITES)
    for name, record in records.items():
        assert record["events"] == [{"kind": "gaussian", "noise_multiplier": pytest.approx(z), "count": 1}], name
        assert record["epsilon"] == pytest.approx(eps) and record["epsilon"] <= record["budget"] == 100.0
    # what left the sites: noised latents of the encoder's shape, never anything of the images' shape
    for s in wire.of_round(2):
        images, encoded = torch.cat(wire.encoder_in[s.site]), torch.cat(wire.encoder_out[s.site])
        assert images.shape[:2] == (4, 3) and images.shape[2:] == (32, 32)  # FLAIR x 3 slices per item
        assert s.tensors["latents.latents"].shape == encoded.shape and encoded.shape[0] == 4
        assert not torch.allclose(s.tensors["latents.latents"], encoded, atol=0.1)  # noised
        assert s.meta["protected"] is True
    for s in wire.sent:
        assert not [k for k, t in s.tensors.items() if t.shape[-3:] == (3, 32, 32)], (s.site, s.round, s.kind)


def test_a_budget_too_small_for_the_upload_sends_nothing_and_passes_no_budget(brats_data, tmp_path, monkeypatch,
                                                                              capsys):  # fmt: skip
    """Budget 20: the construction check (one item per case, epsilon 12.30) passes; the upload of 4 items per case
    (30.13) is refused at release, so no site sends anything, the round fails and says why, and every ledger is
    empty. Budget 10: refused when the sites are built, before any round."""
    wire = install_spies(monkeypatch)
    out = tmp_path / "small"
    assert flair_fedreplay(brats_data, out, "--epsilon-budget", "20", "--latent-noise-multiplier", "1") == 1
    assert "no site's upload was acceptable" in capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in m["rounds"]] == [1] and "upload" not in m
    assert m["stopped"]["round"] == 2
    failed = m["stopped"]["failed_round"]["sites"]
    assert set(failed) == set(SITES)
    for entry in failed.values():
        why = entry.get("rejected", entry.get("reason"))  # the round record's reason for a refused site
        assert entry["accepted"] is False and "release refused" in str(why), entry
        assert entry["privacy"]["epsilon"] == 0.0 and entry["privacy"]["exhausted"] is True
    assert not [s for s in wire.sent if s.kind == "latents"]  # nothing was encoded, let alone sent
    records = store_records()
    assert set(records) == set(SITES)  # the store holds each site's record of the run: no release in it
    for name, record in records.items():
        assert record["events"] == [] and record["epsilon"] == 0.0, name

    assert flair_fedreplay(brats_data, tmp_path / "tiny", "--epsilon-budget", "10", "--latent-noise-multiplier",
                           "1") == 2  # fmt: skip
    assert "costs epsilon 12.3" in capsys.readouterr().err
    assert not (tmp_path / "tiny" / "metrics.json").exists()


def test_the_mechanism_on_the_default_bundle_is_either_refused_at_once_or_protects_the_upload(tiny_data, tmp_path):
    """The default bundle's labels are class indices {0, 1, 2}; the mechanism's bound needs labels in [0, 1]. A
    protected FedReplay run must then be refused before it trains anything (a configuration error), or make the
    labels fit (one-hot masks) and send protected uploads; it must not train the encoder site for a round and then
    fail every upload."""
    overrides = {**tiny_overrides(tiny_data), "privacy_epsilon_budget": 100.0, "latent_noise_multiplier": 1.0}
    bundle = BundleSpec(BUNDLE_DIR, ("train.json", "budget.json", "latents.json"), overrides)
    sim = simulator(bundle, tmp_path / "run")
    try:
        m = sim.run()
    except (PrivacyConfigError, FederationError) as exc:
        assert isinstance(exc, PrivacyConfigError), f"the run failed after {len(sim.history)} round(s): {exc}"
        assert sim.history == [] and not (tmp_path / "run" / "metrics.json").exists()
    else:
        assert all(m["upload"][name]["protected"] for name in SITES)
