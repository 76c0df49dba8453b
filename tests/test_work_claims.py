"""Issue 16: the server bounds what a site claims (local steps, samples), never raises for a typed-wrong field, and
turns malformed bytes into that site's rejection: in ServerRound, in the simulator and through the CLI faults."""

from __future__ import annotations

import json

import pytest
import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.codec import decode_update, encode_update
from monai_fedpriv.fl.nvflare.settings import JobSettings
from monai_fedpriv.fl.server import ServerRound
from monai_fedpriv.fl.server.work import DP_EXTRA_STEPS, WorkBound, steps_per_round, work_bounds
from monai_fedpriv.fl.simulator import Fault, FaultInjector, parse_fault
from monai_fedpriv.fl.strategies import FedAvg
from monai_fedpriv.fl.transport.inprocess import InProcessTransport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate
from tests.test_fail_closed import bundle, simulate  # noqa: F401 - fixture and helper

REF = {"w": torch.zeros(4), "n": torch.tensor(0)}


def upd(site, value, steps=10, samples=8, rnd=1):
    return ModelUpdate(site, rnd, {"w": torch.full((4,), value), "n": torch.tensor(1)}, samples, steps)


BOUNDS = {s: WorkBound(max_steps=12, n_samples=8) for s in ("a", "b", "c")}


def test_step_weighted_fedavg_rejects_a_site_claiming_1e12_steps_and_aggregates_the_others():
    ups = [upd("a", 1.0, steps=10), upd("b", 4.0, steps=5), upd("c", 0.5, steps=10**12)]
    unbounded = ServerRound(FedAvg("steps"), min_sites=1)(1, REF, ups, ["a", "b", "c"])
    assert torch.allclose(unbounded.weights["w"], torch.full((4,), 0.5))  # without bounds: exactly site c's update
    out = ServerRound(FedAvg("steps"), min_sites=1)(1, REF, ups, ["a", "b", "c"], work_bounds=BOUNDS)
    assert out.accepted == ["a", "b"] and out.failed is None
    reason = "update from 'c' (round 1) claims 1e+12 local steps, but the server asked for at most 12"
    assert out.rejected["c"] == reason
    assert torch.allclose(out.weights["w"], torch.full((4,), (10 * 1.0 + 5 * 4.0) / 15))
    assert out.sites["c"] == {"rejected": out.rejected["c"]}


def test_a_site_claiming_more_samples_than_it_declared_is_rejected():
    ups = [upd("a", 1.0), upd("b", 3.0, samples=9)]
    out = ServerRound(FedAvg("samples"), min_sites=1)(1, REF, ups, ["a", "b"], work_bounds=BOUNDS)
    assert out.accepted == ["a"] and torch.allclose(out.weights["w"], torch.ones(4))
    assert out.rejected["b"].endswith("claims 9 training samples, but declared 8 when it joined the federation")
    # claims within the bounds (fewer steps: a round cut short by the budget) are aggregated
    ok = ServerRound(FedAvg("steps"))(1, REF, [upd("a", 1.0, steps=3), upd("b", 3.0, steps=12)], ["a", "b"],
                                      work_bounds=BOUNDS)  # fmt: skip
    assert ok.accepted == ["a", "b"] and not ok.rejected


@pytest.mark.parametrize(
    "field,value,reason",
    [("round", "1", "update from 'b': round field is '1' (a str), expected an int."),
     ("local_steps", "many", "update from 'b': local_steps field is 'many' (a str), expected an int."),
     ("local_steps", float("inf"), "update from 'b': local_steps field is inf (a float), expected an int."),
     ("n_samples", float("nan"), "update from 'b': n_samples field is nan (a float), expected an int."),
     ("local_steps", None, "update from 'b': local_steps field is None (a NoneType), expected an int."),
     ("meta", ["x"], "update from 'b': meta field is a list, expected a dict.")],
)  # fmt: skip
def test_server_round_rejects_typed_wrong_fields_without_raising(field, value, reason):
    bad = upd("b", 2.0)
    setattr(bad, field, value)
    for strategy in (FedAvg("steps"), FedAvg("samples")):
        out = ServerRound(strategy, min_sites=1)(1, REF, [upd("a", 1.0), bad], ["a", "b"], work_bounds=BOUNDS)
        assert out.accepted == ["a"] and out.rejected == {"b": reason}
        assert torch.allclose(out.weights["w"], torch.ones(4))


def test_bounds_of_the_work_the_server_asked_for():
    assert steps_per_round(10, 4, local_epochs=2) == 6 and steps_per_round(10, 4, local_steps=7) == 7
    assert steps_per_round(8, 4, local_epochs=1) == 2
    assert steps_per_round(8, 4, local_epochs=1, dp_sgd=True) == 2 * 2 + DP_EXTRA_STEPS  # empty Poisson draws
    settings = JobSettings("j", "b", ["train.json"], {}, 2, ["site-1", "site-2"], local_epochs=3)
    bounds = work_bounds(settings, 4, False, declared={"site-1": 10})
    assert bounds == {"site-1": WorkBound(9, 10, 9), "site-2": WorkBound(None, None)}  # site-2 has not declared yet
    settings.local_epochs, settings.local_steps = None, 5
    assert work_bounds(settings, 4, False, {})["site-2"] == WorkBound(5, None, 5)
    assert work_bounds(settings, 4, True, {})["site-2"] == WorkBound(2 * 5 + DP_EXTRA_STEPS, None, 5)


def test_a_plausible_claim_above_the_work_asked_is_weighted_as_the_work_asked():
    """Under DP-SGD a claim may pass the iterations asked (noise-only steps) up to the plausible bound; it is
    accepted but weighted as the steps asked, so it never outweighs an honest site that did all the work."""
    bounds = {s: WorkBound(max_steps=2 * 2 + DP_EXTRA_STEPS, n_samples=8, weight_steps=2) for s in ("a", "b")}
    honest, padded = upd("a", 1.0, steps=2), upd("b", 3.0, steps=30)
    out = ServerRound(FedAvg("steps"), min_sites=1)(1, REF, [honest, padded], ["a", "b"], work_bounds=bounds)
    assert out.accepted == ["a", "b"] and torch.allclose(out.weights["w"], torch.full((4,), 2.0))  # equal weights
    assert out.sites["b"]["local_steps"] == 2 and out.sites["b"]["local_steps_claimed"] == 30
    assert "local_steps_claimed" not in out.sites["a"]


def test_new_fault_kinds_tamper_after_the_filters():
    assert parse_fault("site-2:bytes:1") == Fault("site-2", "bytes", 1)
    injector = FaultInjector([Fault("s", "overclaim", 1), Fault("s", "bytes", 2)])
    honest = upd("s", 1.0)
    claimed = injector.tamper(honest)
    assert claimed.local_steps == 10**12 and torch.equal(claimed.delta["w"], honest.delta["w"])
    assert injector.tamper_bytes(honest, b"data") == b"data"  # not due in round 1
    bad = injector.tamper_bytes(upd("s", 1.0, rnd=2), encode_update(upd("s", 1.0, rnd=2)))
    with pytest.raises(UpdateError, match="more than 2147483647 elements"):
        decode_update(bad)


def test_the_in_process_transport_turns_undecodable_bytes_into_a_rejection():
    transport = InProcessTransport(tamper_bytes=FaultInjector([Fault("b", "bytes", 1)]).tamper_bytes)
    transport.publish(GlobalModel(0, REF))
    transport.send(upd("a", 1.0))
    transport.send(upd("b", 2.0))  # the site's training goes on: nothing raises at the sender
    assert transport.has_update("b") and [u.site for u in transport.collect()] == ["a"]
    reason = transport.take_rejected()["b"]
    assert reason.startswith("undecodable update: malformed encoded update from 'b' (round 1): tensors[0] ('w'):")
    assert transport.take_rejected() == {}
    transport.send(upd("c", 1.0, rnd=2))  # decoded against the round in progress
    assert "round field is 2, expected 1 (the round in progress)" in transport.take_rejected()["c"]


def test_the_simulator_rejects_malformed_bytes_and_an_overclaim_and_aggregates_the_others(bundle, tmp_path):  # noqa: F811
    out = tmp_path / "hostile"
    faults = ["--inject-fault", "site-2:bytes:1", "--inject-fault", "site-3:overclaim:1", "--min-sites", "1"]
    assert simulate(bundle, out, *faults, rounds=2, sites=3) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert_hostile_sites_rejected(m, asked_steps=2)
    assert m["rounds"][0]["sites"]["site-1"]["local_steps"] == 2  # honest sites sit within the bound


def assert_hostile_sites_rejected(metrics: dict, asked_steps: int) -> None:
    """Round 1 of ``--inject-fault site-2:bytes:1 --inject-fault site-3:overclaim:1``: both rejected with their
    reasons, site-1 aggregated; round 2 clean."""
    first, second = metrics["rounds"]
    bad_bytes = first["sites"]["site-2"]["rejected"]
    assert bad_bytes.startswith("undecodable update: malformed encoded update from 'site-2' (round 1): tensors[0]")
    assert "more than 2147483647 elements" in bad_bytes
    assert first["sites"]["site-3"]["rejected"] == (
        f"update from 'site-3' (round 1) claims 1e+12 local steps, but the server asked for at most {asked_steps}"
    )
    assert first["global"]["rejected"] == 2 and "rejected" not in first["sites"]["site-1"]
    assert second["global"]["rejected"] == 0 and metrics["final"]["rounds_completed"] == 2


def test_a_site_decodes_the_server_s_models_against_its_own():
    pytest.importorskip("nvflare")
    from types import SimpleNamespace

    from monai_fedpriv.fl.codec import encode_global
    from monai_fedpriv.fl.nvflare.transport import NVFlareTransport

    answers = [encode_global(GlobalModel(0, REF)), encode_global(GlobalModel(1, {**REF, "w": torch.zeros(2**20)}))]

    class Flare:  # what the Client API hands the site loop: one encoded global model per task
        def is_running(self):
            return True

        def receive(self):
            return SimpleNamespace(params={"global": answers.pop(0)}, meta={})

        def get_task_name(self):
            return "train"

    transport = NVFlareTransport()
    transport.flare = Flare()
    assert transport.pull().model.round == 0 and set(transport.expected.tensors) == set(REF)  # pinned
    with pytest.raises(UpdateError, match=r"shape \[1048576\] float32, but the model's is \[4\] float32"):
        transport.pull()  # a larger model than the site's is refused from its header
    transport.expect({"w": torch.zeros(4)})
    assert set(transport.expected.tensors) == {"w"}


# --- the NVIDIA FLARE controller's answers: site-controlled meta is checked, never crashes the round ------------------


def test_read_answer_turns_malformed_meta_into_a_one_line_rejection():
    from monai_fedpriv.fl.nvflare.answers import MalformedAnswer, read_answer

    cases = {
        "malformed answer: result field is a str, expected an object": {"result": "x"},
        "malformed answer: global n_cases is a str, expected a count": {
            "global": {"global_dice": 0.5, "n_cases": "many"}
        },
        "malformed answer: result privacy epsilon is a str, expected a finite number": {
            "result": {"privacy": {"epsilon": "x"}}
        },
        "malformed answer: result privacy is a str, expected an object": {"result": {"privacy": "x"}, "failed": "boom"},
        "malformed answer: global global_dice is inf, expected a finite number": {
            "global": {"global_dice": float("inf")}
        },
        "malformed answer: setup field is a list, expected an object": {"setup": [1]},
        "malformed answer: meta is a str, expected an object": "x",
    }
    for message, meta in cases.items():
        with pytest.raises(MalformedAnswer) as err:
            read_answer(meta)
        assert str(err.value) == message
    with pytest.raises(MalformedAnswer, match="result field takes .* bytes, more than 65536"):
        read_answer({"result": {"x": "a" * 70000}})
    ok = read_answer({"result": {"loss": 0.5, "privacy": {"epsilon": 1.5, "delta": 1e-5}},
                      "global": {"global_dice": 0.7, "n_cases": 3}, "failed": "trainer\nraised"})  # fmt: skip
    assert ok.result["privacy"]["epsilon"] == 1.5 and ok.scored["n_cases"] == 3 and ok.failed == "trainer raised"
    assert read_answer({}).result == {} and read_answer({}).scored == {} and read_answer({}).failed is None


def test_records_ignore_a_privacy_entry_whose_epsilon_is_not_a_finite_number():
    from monai_fedpriv.fl.server.records import global_privacy, progress_cell, update_facts

    bad = upd("a", 1.0)
    bad.meta["privacy"] = {"epsilon": "x"}
    assert "privacy" not in update_facts(bad, None)
    history = [{"sites": {"a": {"privacy": {"epsilon": "x"}}, "b": {"privacy": {"epsilon": 2.0}},
                          "c": {"privacy": {"epsilon": float("nan")}}, "d": {"privacy": "x"}}}]  # fmt: skip
    assert global_privacy(history)["per_site"] == {"b": 2.0}
    assert progress_cell("a", {"loss": 0.5, "privacy": "x"}) == "a loss 0.500"


def test_a_first_update_weighs_at_most_the_median_other_site_and_declares_that_much():
    """A FLARE site that has not declared its samples yet (its first accepted update sets the bound) cannot take the
    aggregate with that update: it is weighed as the median of the other accepted sites at most."""
    settings = JobSettings("j", "b", ["train.json"], {}, 2, ["a", "b", "c"], local_epochs=1)
    bounds = work_bounds(settings, 4, False, declared={})
    assert bounds["a"] == WorkBound(None, None)  # nothing declared: no bound of its own under local epochs
    assert work_bounds(settings, 4, False, declared={"a": 12})["a"] == WorkBound(3, 12, 3)
    ups = [upd("a", 1.0, steps=3, samples=12), upd("b", 1.0, steps=2, samples=8), upd("c", 7.0, steps=10**12,
                                                                                       samples=2**53)]  # fmt: skip
    for weighting in ("steps", "samples"):
        out = ServerRound(FedAvg(weighting), min_sites=1)(1, REF, ups, ["a", "b", "c"], work_bounds=bounds)
        assert out.accepted == ["a", "b", "c"]
        assert out.sites["c"]["local_steps"] == 2 and out.sites["c"]["n_samples"] == 10  # medians of a and b
        assert out.sites["c"]["local_steps_claimed"] == 10**12
        assert float(out.weights["w"][0]) < 4.0  # one site of three at most an equal share, never the aggregate
