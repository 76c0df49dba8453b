"""The ledger belongs to the data: spent epsilon outlives a run, a new run on the same cases starts from it, and a
rerun into a used --output changes nothing."""

from __future__ import annotations

import hashlib
import json

import pytest

from monai_fedpriv.cli import main
from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.events import PureEvent
from monai_fedpriv.privacy.ledger_store import LedgerStore, case_ids
from tests.test_share_cli import tiny_cli_bundle  # noqa: F401 - fixture

CASES_A = [{"image": f"a{i}.nii.gz", "patient": f"p{i}"} for i in range(6)]
CASES_B = [{"image": f"b{i}.nii.gz"} for i in range(4)]


def _spend(store: LedgerStore, run_id: str, site: str, cases, epsilon: float, **kw) -> PrivacyBudget:
    budget = PrivacyBudget(limit=kw.pop("limit", 100.0), accountant=kw.pop("accountant", "rdp"))
    binding = store.bind(budget, site, run_id, cases, **kw)
    budget.release(PureEvent(epsilon, "svt"), "test")
    binding.save()
    return budget


def test_a_second_run_on_overlapping_cases_carries_the_first_runs_spending(tmp_path):
    store = LedgerStore(tmp_path)
    _spend(store, "run1", "site-1", CASES_A, 3.0)
    # another run, the cases regrouped: one patient of run 1 is enough to carry its whole spending
    later = PrivacyBudget(limit=100.0)
    binding = store.bind(later, "site-9", "run2", [CASES_A[4], *CASES_B])
    assert binding.carried_epsilon == pytest.approx(3.0)
    assert later.epsilon() == pytest.approx(3.0)
    later.release(PureEvent(1.0, "svt"), "test")
    assert later.epsilon() == pytest.approx(4.0)
    assert later.ledger.events == [{"kind": "pure", "epsilon": 1.0, "label": "svt", "count": 1}]  # its own only
    # disjoint cases carry nothing; a fresh budget carries nothing but the earlier record stays
    assert store.bind(PrivacyBudget(limit=9.0), "site-1", "run3", CASES_B).carried_epsilon == 0.0
    fresh = store.bind(PrivacyBudget(limit=9.0), "site-1", "run4", CASES_A, fresh=True)
    assert fresh.carried_epsilon == 0.0 and fresh.facts()["fresh_budget"] is True
    assert len(store.earlier(case_ids(CASES_A), "run5")) == 1


def test_a_budget_spent_by_earlier_runs_is_exhausted_at_the_start(tmp_path):
    store = LedgerStore(tmp_path)
    _spend(store, "run1", "site-1", CASES_A, 9.5, limit=10.0)
    budget = PrivacyBudget(limit=10.0)
    budget.reserve("svt", PureEvent(1.0, "svt"))
    store.bind(budget, "site-1", "run2", CASES_A)
    assert budget.exhausted and "earlier runs on this site's data already spent epsilon 9.5" in budget.stop_reason
    assert not budget.allows([PureEvent(0.6, "svt")], reserve=False)


def test_a_resumed_run_takes_its_record_when_it_is_ahead_of_the_checkpoint(tmp_path):
    store = LedgerStore(tmp_path)
    budget = _spend(store, "run1", "site-1", CASES_A, 2.0)
    checkpoint = budget.state_dict()
    budget.release(PureEvent(1.5, "svt"), "test")  # released after the checkpoint, then the process died
    store.bind(budget, "site-1", "run1", CASES_A).save()
    restored = PrivacyBudget(limit=100.0)
    restored.load_state_dict(checkpoint)
    assert restored.epsilon() == pytest.approx(2.0)
    store.bind(restored, "site-1", "run1", CASES_A, resumed=True)
    assert restored.epsilon() == pytest.approx(3.5)


def test_unreadable_records_and_unaccountable_carried_events_are_refused(tmp_path):
    store = LedgerStore(tmp_path)
    _spend(store, "run1", "site-1", CASES_A, 1.0)
    with pytest.raises(PrivacyConfigError, match="PRV accountant cannot account"):
        store.bind(PrivacyBudget(limit=10.0, accountant="prv"), "site-1", "run2", CASES_A)
    (tmp_path / "run1__site-1.json").write_text("{not json")
    with pytest.raises(PrivacyConfigError, match="run1__site-1.json is unreadable"):
        store.bind(PrivacyBudget(limit=10.0), "site-1", "run2", CASES_A)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrivacyConfigError, match="is a file, not a folder"):
        LedgerStore(tmp_path / "file")


def test_ledger_state_keeps_carried_events_apart_and_validated():
    ledger = PrivacyLedger()
    ledger.carry([{"kind": "pure", "epsilon": 2.0, "label": "svt", "count": 1}])
    ledger.record_pure(1.0, "svt")
    assert ledger.epsilon(1e-5) == pytest.approx(3.0) and len(ledger.events) == 1
    copy = PrivacyLedger()
    copy.load_state_dict(ledger.state_dict())
    assert copy.epsilon(1e-5) == pytest.approx(3.0) and copy.carried == ledger.carried
    with pytest.raises(PrivacyConfigError):
        ledger.carry([{"kind": "pure", "epsilon": float("nan"), "count": 1}])


SVT = ["--share", "svt", "--share-fraction", "0.1", "--svt-epsilon", "1", "--svt-epsilon3", "1"]


def _run(bundle, out, *extra):
    argv = ["simulate", str(bundle), "--sites", "2", "--rounds", "2", "--local-steps", "1", "--output", str(out),
            "--config-files", "train.json", "fed.json", "tiny.json", "small.json", "--partition", "iid",
            "--no-report", *SVT, *extra]  # fmt: skip
    return main(argv)


def _epsilons(out):
    m = json.loads((out / "metrics.json").read_text())
    return [[s.get("privacy", {}).get("epsilon") for s in r["sites"].values()] for r in m["rounds"]], m


def test_a_new_run_on_the_same_data_starts_from_the_stored_epsilon_and_never_passes_the_budget(
    tiny_cli_bundle, tmp_path, capsys  # noqa: F811
):
    store = tmp_path / "ledgers"
    assert _run(tiny_cli_bundle, tmp_path / "r1", "--epsilon-budget", "7", "--ledger-dir", str(store)) == 0
    first, _ = _epsilons(tmp_path / "r1")
    assert first == [[2.0, 2.0], [4.0, 4.0]]
    # the same data, another run directory: round 1 continues at 4 + 2; round 2 would reach 8 > 7 and is refused
    assert _run(tiny_cli_bundle, tmp_path / "r2", "--epsilon-budget", "7", "--ledger-dir", str(store)) == 0
    second, m = _epsilons(tmp_path / "r2")
    assert second[0] == [6.0, 6.0]
    assert all(e is None or e <= 7.0 for row in second for e in row)
    assert "earlier runs on its data spent epsilon 4.0000" in capsys.readouterr().out
    assert m["ledger_store"]["fresh_budget"] is False
    assert m["ledger_store"]["sites"]["site-1"] == {"carried_epsilon": 4.0, "earlier_runs": 1}
    # a third run finds no room at all; --fresh-budget starts at zero and says so
    assert _run(tiny_cli_bundle, tmp_path / "r3", "--epsilon-budget", "7", "--ledger-dir", str(store)) == 0
    third, m3 = _epsilons(tmp_path / "r3")
    assert all(e is None or e <= 7.0 for row in third for e in row) and "stopped" in m3
    assert _run(tiny_cli_bundle, tmp_path / "r4", "--epsilon-budget", "7", "--ledger-dir", str(store),
                "--fresh-budget") == 0  # fmt: skip
    fourth, m4 = _epsilons(tmp_path / "r4")
    assert fourth[0] == [2.0, 2.0] and m4["ledger_store"]["fresh_budget"] is True


def _checksums(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_rerun_into_a_used_output_is_refused_and_changes_nothing(tiny_cli_bundle, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert _run(tiny_cli_bundle, out, "--epsilon-budget", "50") == 0
    before = _checksums(out)
    capsys.readouterr()
    assert _run(tiny_cli_bundle, out, "--epsilon-budget", "50") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "new --output" in err
    assert len(err.strip().splitlines()) == 1
    assert _checksums(out) == before


def test_a_resume_never_counts_less_than_its_checkpoint_carried(tmp_path):
    """A store emptied or moved between a run and its resume: the checkpoint's carried events still count."""
    store = LedgerStore(tmp_path / "store")
    _spend(store, "run1", "site-1", CASES_A, 5.0)
    budget = PrivacyBudget(limit=100.0)
    store.bind(budget, "site-1", "run2", CASES_A)
    budget.release(PureEvent(1.0, "svt"), "test")
    checkpoint = budget.state_dict()
    restored = PrivacyBudget(limit=100.0)
    restored.load_state_dict(checkpoint)
    LedgerStore(tmp_path / "empty").bind(restored, "site-1", "run2", CASES_A, resumed=True)
    assert restored.epsilon() == pytest.approx(6.0)


@pytest.mark.parametrize("events", [None, "abc", {}, [{"kind": "pure", "count": 1}], [{"kind": "gaussian"}]])
def test_a_damaged_record_is_refused_never_counted_as_zero(tmp_path, events):
    store = LedgerStore(tmp_path)
    _spend(store, "run1", "site-1", CASES_A, 4.0)
    record = json.loads((tmp_path / "run1__site-1.json").read_text())
    record["events"] = events
    (tmp_path / "run1__site-1.json").write_text(json.dumps(record))
    with pytest.raises(PrivacyConfigError, match="run1__site-1.json"):
        store.bind(PrivacyBudget(limit=10.0), "site-1", "run2", CASES_A)
