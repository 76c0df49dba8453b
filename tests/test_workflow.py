"""The one run loop and the methods on it: strategies in the registry, round instructions, FedProx, cyclic weight
transfer, FedAvg+Share, exact resume of every strategy, the metrics contract, and the CLI's strategy flags."""

import json

import pytest
import torch

from monai_fedpriv.cli import main
from monai_fedpriv.errors import UpdateError
from monai_fedpriv.experiments import bundle_datalist, split_sites
from monai_fedpriv.fl.codec import decode, decode_global, encode, encode_global
from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
from monai_fedpriv.fl.strategies import STRATEGIES, FedAvg, FedAvgM, build_strategy
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate
from tests.conftest import assert_same_run


def _split(bundle, n_sites=2):
    return split_sites(bundle_datalist(bundle), n_sites, "iid", seed=0)


def _sim(bundle, out, rounds, strategy, n_sites=2, **kw):
    split = _split(bundle, n_sites)
    return FederatedSimulator(bundle, split.train, split.val, rounds, LocalWork(epochs=1), out, progress=False,
                              strategy=strategy, **kw)  # fmt: skip


def _weights(folder):
    return torch.load(folder / "models" / "model.pt")


# ---------------------------------------------------------------------------------------------------- strategies
def test_fedavgm_with_momentum_zero_equals_fedavg():
    gen = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(4, 3, generator=gen), "n": torch.tensor(2)}
    avg, avgm = FedAvg(), FedAvgM(momentum=0.0)
    wa, wm = dict(w), dict(w)
    for rnd in range(1, 4):
        ups = [ModelUpdate(f"s{k}", rnd, {"a": torch.randn(4, 3, generator=gen), "n": torch.tensor(1)}, 5, 2 + k)
               for k in range(3)]  # fmt: skip
        wa, wm = avg.aggregate(wa, ups), avgm.aggregate(wm, ups)
        for key in w:
            assert torch.equal(wa[key], wm[key]), key


def test_every_strategy_is_built_from_its_settings_and_configures_rounds():
    sites = ["a", "b", "c"]
    for name in STRATEGIES:
        strategy = build_strategy(name)
        strategy.start(sites)
        plan = strategy.configure_round(1, sites)
        assert strategy.config()["name"] == name
        assert all(isinstance(i, RoundInstruction) for i in plan.values())
    cwt = build_strategy("cwt")
    cwt.start(sites)
    assert [list(cwt.configure_round(r, sites)) for r in range(1, 6)] == [["a"], ["b"], ["c"], ["a"], ["b"]]
    # b has left: the next active sites in the order, each keeping one turn a cycle
    assert [list(cwt.configure_round(r, ["a", "c"])) for r in range(6, 10)] == [["c"], ["a"], ["c"], ["a"]]
    again = build_strategy("cwt")
    again.load_state_dict(cwt.state_dict())  # the position survives a restart
    assert again.configure_round(10, sites) == {"b": RoundInstruction(whole_batches=True)}
    assert build_strategy("fedprox", prox_mu=0.5).configure_round(1, sites)["b"].prox_mu == 0.5
    with pytest.raises(ValueError, match="--prox-mu"):
        build_strategy("fedprox", prox_mu=-1.0)
    with pytest.raises(ValueError, match="takes no setting"):
        build_strategy("cwt", weighting="steps")


def test_instructions_travel_in_the_global_model_and_are_decoded_as_untrusted():
    model = GlobalModel(2, {"w": torch.ones(3)}, instructions={"site-1": RoundInstruction(prox_mu=0.1),
                                                              "site-2": RoundInstruction(whole_batches=True)})
    back = decode(encode(model))
    assert back.instruction_for("site-1").prox_mu == 0.1 and back.instruction_for("site-2").whole_batches
    assert back.instruction_for("site-3") == RoundInstruction()
    assert isinstance(decode(encode(ModelUpdate("s", 1, {"w": torch.ones(3)}, 1, 1))), ModelUpdate)
    import zlib

    from monai_fedpriv.fl.wire import PREFIX

    for bad in ({"site-1": {"prox_mu": float("inf")}}, {"site-1": {"local_steps": -3}}, {"../x": {}},
                {"site-1": {"surprise": 1}}, ["site-1"]):  # fmt: skip
        blob = encode_global(model)
        _, version, n = PREFIX.unpack(blob[: PREFIX.size])
        header = json.loads(zlib.decompress(blob[PREFIX.size: PREFIX.size + n]))
        header["instructions"] = bad
        head = zlib.compress(json.dumps(header).encode())
        forged = PREFIX.pack(b"MFPG", version, len(head)) + head + blob[PREFIX.size + n:]
        with pytest.raises(UpdateError, match="instruction"):
            decode_global(forged)


# ---------------------------------------------------------------------------------------------------- methods
def test_fedprox_with_mu_zero_trains_fedavg_bit_for_bit_and_mu_changes_it(tiny_bundle, tmp_path):
    _sim(tiny_bundle, tmp_path / "avg", 2, build_strategy("fedavg")).run()
    prox0 = _sim(tiny_bundle, tmp_path / "p0", 2, build_strategy("fedprox", prox_mu=0.0))
    prox0.run()
    a, b = _weights(tmp_path / "avg"), _weights(tmp_path / "p0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    prox = _sim(tiny_bundle, tmp_path / "p", 2, build_strategy("fedprox", prox_mu=5.0))
    m = prox.run()
    assert all(site.sync.instruction.prox_mu == 5.0 for site in prox.sites.values())  # what the sites received
    c = _weights(tmp_path / "p")
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert m["strategy"] == {"name": "fedprox", "weighting": "steps", "server_lr": 1.0, "prox_mu": 5.0}


def test_cwt_visits_the_sites_in_order_with_whole_batches_and_records_forgetting(tiny_bundle, tmp_path):
    sim = _sim(tiny_bundle, tmp_path, 4, build_strategy("cwt"))
    m = sim.run()
    sizes = {name: len(cases) for name, cases in sim.train_sites.items()}
    assert [list(r["sites"]) for r in m["rounds"]] == [["site-1"], ["site-2"], ["site-1"], ["site-2"]]
    for r in m["rounds"]:
        (name, entry), = r["sites"].items()
        assert entry["local_steps"] == sizes[name] // 4  # floor(|D_k| / b), batch 4
        assert entry["messages"] == 2 and entry["bytes_received"] > 0 and entry["bytes_sent"] > 0
        assert set(r["global"]["per_site"]) == {"site-1", "site-2"}  # each model scored on every site
    from monai_fedpriv.experiments.compare import forgetting_matrix

    matrix = forgetting_matrix(m)
    assert len(matrix) == 2 and all(len(row) == 2 and None not in row for row in matrix)


def test_fedavg_share_mixes_a_public_pool_that_dp_sgd_does_not_count(tiny_bundle, tiny_data, tmp_path):
    from monai_fedpriv.data.share_pool import is_public
    from tests.test_dp_simulation import _dp_bundle

    split = _split(tiny_bundle)
    strategy = build_strategy("fedavg-share", share_data_fraction=0.2)
    train = strategy.site_data(split.train, 0)
    pool = [c for c in train["site-1"] if is_public(c)]
    assert pool and pool == [c for c in train["site-2"] if is_public(c)]  # the same pool at every site
    private = {s: [c for c in cases if not is_public(c)] for s, cases in train.items()}
    assert sum(map(len, private.values())) + len(pool) == sum(map(len, split.train.values()))
    sim = FederatedSimulator(_dp_bundle(tiny_data), split.train, split.val, 1, LocalWork(epochs=1), tmp_path,
                             progress=False, strategy=strategy)  # fmt: skip
    m = sim.run()
    for name, entry in m["rounds"][0]["sites"].items():
        facts = entry["privacy"]
        assert facts["sample_rate"] == pytest.approx(2 / len(private[name]))  # b / N_private, never b / (N + pool)
        assert facts["public_units"] == len(pool)


@pytest.mark.parametrize("name", [s for s in STRATEGIES if s != "cwt-replay"])  # its resume: test_split_and_replay
def test_every_strategy_resumes_exactly(tiny_bundle, tmp_path, name):
    options = {"fedprox": {"prox_mu": 0.5}, "fedavg-share": {"share_data_fraction": 0.2}}.get(name, {})
    kw = {"latents_unprotected": True} if name in ("fedreplay", "splitnn") else {}
    rounds = 4 if name == "fedreplay" else 3  # FedReplay: encoder, upload, two server rounds (cut in the server phase)
    full = _sim(tiny_bundle, tmp_path / "full", rounds, build_strategy(name, **options), n_sites=3, **kw).run()
    _sim(tiny_bundle, tmp_path / "cut", rounds - 1, build_strategy(name, **options), n_sites=3, **kw).run()
    resumed = _sim(tiny_bundle, tmp_path / "cut", rounds, build_strategy(name, **options), n_sites=3,
                   **kw).run(resume=True)  # fmt: skip
    assert_same_run(full, resumed, tmp_path / "full", tmp_path / "cut")


# ---------------------------------------------------------------------------------------------------- CLI
def test_strategy_flags_are_checked_against_the_strategy(tmp_path, capsys):
    from tests.conftest import BUNDLE_DIR

    base = ["simulate", str(BUNDLE_DIR), "--output", str(tmp_path / "o"), "--rounds", "1"]
    for extra, words in ((["--strategy", "fedavg", "--prox-mu", "0.1"], "--prox-mu is used by --strategy fedprox"),
                         (["--aggregator", "median", "--trim-fraction", "0.1"], "--trim-fraction is used by"),
                         (["--strategy", "fedprox", "--prox-mu", "-1"], "--prox-mu -1.0: should be >= 0"),
                         (["--strategy", "fedavg-share", "--share-data-fraction", "0.9"], "--share-data-fraction"),
                         (["--strategy", "cwt", "--server-lr", "2"], "--server-lr is used by"),
                         (["--strategy", "cwt", "--local-steps", "5"], "sets each round's local work"),
                         (["--strategy", "cwt", "--min-sites", "2"], "asks 1 site(s) a round")):  # fmt: skip
        assert main(base + extra) == 2
        assert words in capsys.readouterr().err


def test_filter_coverage_is_declared_per_message_kind():
    from monai_fedpriv.errors import PrivacyConfigError
    from monai_fedpriv.privacy.filters import FilterChain
    from monai_fedpriv.privacy.filters.base import copy_update

    class Covers:
        def __init__(self, *names):
            self.covers = frozenset(names)

        def __call__(self, update):
            return copy_update(update)

    FilterChain([Covers("update.delta")]).check_coverage({"update.delta"})
    FilterChain([Covers("delta")]).check_coverage({"update.delta"})  # a bare field is a field of an update
    with pytest.raises(PrivacyConfigError, match="update.optimizer_state"):
        FilterChain([Covers("update.delta")]).check_coverage({"update.delta", "update.optimizer_state"})
    with pytest.raises(PrivacyConfigError, match="unknown message fields"):
        FilterChain([Covers("global.weights")])
    with pytest.raises(PrivacyConfigError, match="not known message fields"):
        FilterChain([]).check_coverage({"batch.activations"})  # a kind nobody registered never leaves a site


def test_only_fedavg_share_declares_data_public(tiny_bundle, tmp_path):
    from monai_fedpriv.errors import DataError

    split = _split(tiny_bundle)
    marked = {s: [{**c, "public": i == 0} for i, c in enumerate(cases)] for s, cases in split.train.items()}
    for name in ("fedavg", "fedavg-share"):  # a data list never moves its own cases out of the accounting
        with pytest.raises(DataError, match="declares items 'public'"):
            FederatedSimulator(tiny_bundle, marked, split.val, 1, LocalWork(epochs=1), tmp_path, progress=False,
                               strategy=build_strategy(name))  # fmt: skip


def test_the_ledger_store_never_forgets_releases_of_a_run(tmp_path):
    from monai_fedpriv.errors import PrivacyConfigError
    from monai_fedpriv.privacy.accounting import PrivacyLedger
    from monai_fedpriv.privacy.ledger_store import LedgerStore

    store = LedgerStore(tmp_path)
    spent = PrivacyLedger()
    for _ in range(3):
        spent.record_pure(0.5)
    store.write("run", "site-1", ["a"], spent, {})
    with pytest.raises(PrivacyConfigError, match="refusing to erase"):
        store.write("run", "site-1", ["a"], PrivacyLedger(), {})  # a site that lost its ledger
    fewer = PrivacyLedger()
    fewer.record_pure(0.5, count=2)
    with pytest.raises(PrivacyConfigError, match="3 releases of this run, the site's ledger only 2"):
        store.write("run", "site-1", ["a"], fewer, {})
    assert store.own("run", "site-1")["events"] == spent.events
