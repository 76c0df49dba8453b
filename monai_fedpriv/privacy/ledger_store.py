"""The ledger belongs to the data, not to the run: a site-level store of what every run spent on which cases.

A run directory holds one run's ledger (in its checkpoints). Deleting that directory, or starting a second run on the
same data, must not give the data a new budget, so every site that spends epsilon also keeps a record in a
:class:`LedgerStore` outside the run: one record per (run, site) with the cases the site trained on and the events it
has released so far. A site starting a run *carries* the events of every earlier record whose cases overlap its own
(:meth:`PrivacyLedger.carry`): its budget then covers everything ever released about any of its patients, whichever
run released it.

Cases are identified by their patient (``item["patient"]``) when the data list names one, else by their image
path(s): a patient seen by two runs is counted by both, whatever slices each used. Two data sets whose patient names
collide are counted together (over-counting is safe); the same files copied to another folder without patient names
count as new data.

When a record is written: when the site's budget reports the privacy of an update that is about to leave the site
(the release), and when a run ends. Steps trained but never released (a round whose process was killed) released
nothing and are not recorded; a resumed run takes the larger of its checkpoint's ledger and its record.

Where: ``--ledger-dir`` for ``monai-fedpriv simulate``; else ``$MONAI_FEDPRIV_LEDGER_DIR``; else
``~/.monai_fedpriv/ledgers`` of the account that runs the site (for NVIDIA FLARE: each site's own machine, across
jobs). Starting over on data that already spent its budget needs ``--fresh-budget`` (or
``MONAI_FEDPRIV_FRESH_BUDGET=1`` at a FLARE site), which ``metrics.json`` and the report state; the records of earlier
runs stay, so a later run without it carries them all again.

Example::

    store = LedgerStore.default()
    binding = store.bind(budget, site="site-1", run_id=new_run_id(), cases=train_items)
    ...  # train; at every release:
    binding.save()
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.events import (
    GaussianEvent,
    PureEvent,
    SampledGaussianEvent,
    SkellamEvent,
    check_accountant_supports,
)
from monai_fedpriv.utils.files import atomic_write_text

__all__ = ["FRESH_ENV", "LEDGER_ENV", "LedgerBinding", "LedgerStore", "case_ids", "new_run_id"]

LEDGER_ENV = "MONAI_FEDPRIV_LEDGER_DIR"
FRESH_ENV = "MONAI_FEDPRIV_FRESH_BUDGET"
_VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def new_run_id() -> str:
    """A new run's identity in the store (random, so a deleted run directory reused later is another run)."""
    return uuid.uuid4().hex


def _case_key(item: Mapping[str, Any]) -> str:
    if item.get("patient") not in (None, ""):
        return f"patient:{item['patient']}"
    image = item.get("image")
    if isinstance(image, (list, tuple)):
        return "image:" + "|".join(str(p) for p in image)
    return f"image:{image}"


def case_ids(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """Sorted unique identities of the cases (patients, else images) of a data list, as short SHA-256 digests."""
    return sorted({hashlib.sha256(_case_key(item).encode()).hexdigest()[:24] for item in items})


def _event_object(e: Mapping[str, Any]) -> SampledGaussianEvent | GaussianEvent | PureEvent | SkellamEvent:
    if e["kind"] == "sampled_gaussian":
        return SampledGaussianEvent(e["sample_rate"], e["noise_multiplier"], e["steps"])
    if e["kind"] == "gaussian":
        return GaussianEvent(e["noise_multiplier"], e["count"])
    if e["kind"] == "skellam":
        return SkellamEvent(e["l1"], e["l2"], e["variance"], e["count"])
    return PureEvent(e["epsilon"], e.get("label", ""), e["count"])


class LedgerStore:
    """A folder of ledger records: ``<run>__<site>.json`` (events, updated at every release) next to
    ``<run>__<site>.cases.json`` (the case identities, written once).

    Args:
        root: the folder (created on first write).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise PrivacyConfigError(f"ledger store {self.root} is a file, not a folder (--ledger-dir, ${LEDGER_ENV}).")

    @classmethod
    def default_root(cls) -> Path:
        """``$MONAI_FEDPRIV_LEDGER_DIR``, else ``~/.monai_fedpriv/ledgers``."""
        env = os.environ.get(LEDGER_ENV)
        return Path(env).expanduser() if env else Path.home() / ".monai_fedpriv" / "ledgers"

    @classmethod
    def default(cls) -> LedgerStore:
        return cls(cls.default_root())

    def _stem(self, run_id: str, site: str) -> str:
        return f"{_SAFE.sub('_', run_id)}__{_SAFE.sub('_', site)}"

    def _read(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            # an unreadable record could hide spent epsilon: refuse rather than count it as zero
            raise PrivacyConfigError(
                f"ledger store record {path} is unreadable ({exc}); restore it or move it away knowingly."
            ) from exc

    def records(self) -> list[dict[str, Any]]:
        """Every record in the store, with its ``cases``."""
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*__*.json")):
            if path.name.endswith(".cases.json"):
                continue
            record = self._read(path)
            cases_path = path.with_name(path.name[: -len(".json")] + ".cases.json")
            cases = self._read(cases_path) if cases_path.is_file() else None
            events = record.get("events") if isinstance(record, dict) else None
            if not isinstance(cases, list) or not isinstance(events, list):
                raise PrivacyConfigError(f"ledger store record {path} (or its .cases.json) is malformed.")
            try:  # every event as a live release would be checked: a damaged record never counts as zero
                PrivacyLedger().load_state_dict({"events": record["events"]})
            except PrivacyConfigError as exc:
                raise PrivacyConfigError(f"ledger store record {path} holds a malformed event: {exc}") from None
            out.append({**record, "cases": cases, "path": str(path)})
        return out

    def earlier(self, cases: Sequence[str], run_id: str) -> list[dict[str, Any]]:
        """The records of other runs that trained on any of ``cases``."""
        wanted = set(cases)
        return [r for r in self.records() if r.get("run_id") != run_id and wanted & set(r["cases"])]

    def own(self, run_id: str, site: str) -> dict[str, Any] | None:
        path = self.root / f"{self._stem(run_id, site)}.json"
        return self._read(path) if path.is_file() else None

    def write(self, run_id: str, site: str, cases: Sequence[str], ledger: PrivacyLedger, facts: dict[str, Any]) -> None:
        """Record (atomically) what ``site`` of run ``run_id`` has released so far.

        Raises:
            PrivacyConfigError: the store already records more releases of this run and site than ``ledger`` holds
                (a site that lost part of its ledger would otherwise erase what it spent).
        """
        stem = self._stem(run_id, site)
        held = self.own(run_id, site)
        if held is not None and isinstance(held.get("events"), list) and _releases(held["events"]) > _releases(
            ledger.events
        ):
            raise PrivacyConfigError(
                f"{site}: the ledger store {self.root} records {_releases(held['events'])} releases of this run, the "
                f"site's ledger only {_releases(ledger.events)}; refusing to erase spent epsilon (restore the site's "
                f"state)."
            )
        cases_path = self.root / f"{stem}.cases.json"
        if not cases_path.is_file():
            atomic_write_text(json.dumps(list(cases)), cases_path)
        record = {
            "version": _VERSION, "run_id": run_id, "site": site, "events": ledger.events,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **facts,
        }  # fmt: skip
        atomic_write_text(json.dumps(record, indent=1), self.root / f"{stem}.json")

    def bind(
        self,
        budget: PrivacyBudget,
        site: str,
        run_id: str,
        cases: Sequence[Mapping[str, Any]],
        fresh: bool = False,
        resumed: bool = False,
    ) -> LedgerBinding:
        """Let ``budget`` carry what earlier runs spent on ``cases`` (unless ``fresh``) and record its releases.

        Args:
            resumed: the ledger was just restored from this run's checkpoint; a record of this run that is ahead of
                it (a release made after that checkpoint) replaces it.
        """
        return LedgerBinding(self, budget, site, run_id, case_ids(cases), fresh, resumed)


class LedgerBinding:
    """One site's budget bound to a :class:`LedgerStore` (see :meth:`LedgerStore.bind`)."""

    def __init__(
        self,
        store: LedgerStore,
        budget: PrivacyBudget,
        site: str,
        run_id: str,
        cases: list[str],
        fresh: bool,
        resumed: bool,
    ) -> None:
        self.store, self.budget, self.site, self.run_id, self.cases = store, budget, site, run_id, cases
        self.fresh = bool(fresh)
        earlier = [] if self.fresh else store.earlier(cases, run_id)
        carried = [e for record in earlier for e in record["events"]]
        check_accountant_supports(budget.accountant, [_event_object(e) for e in carried])
        if resumed:
            # never less than the checkpoint knew: its carried events (a store emptied or moved since) and its own
            restored = budget.ledger.carried
            if _spent(restored, budget) > _spent(carried, budget):
                carried = restored
            own = store.own(run_id, site)
            if own is not None and isinstance(own.get("events"), list) and _spent(own["events"], budget) > _spent(
                budget.ledger.events, budget
            ):
                budget.ledger.load_state_dict({"events": own["events"], "carried": []})
        budget.ledger.carry(carried)
        self.earlier_runs = sorted({str(r.get("run_id")) for r in earlier})
        self.carried_epsilon = PrivacyLedger().epsilon_with([_event_object(e) for e in carried], budget.delta,
                                                            budget.accountant) if carried else 0.0  # fmt: skip
        if budget.limit is not None and carried and not budget.allows([]):
            budget.exhaust(
                f"earlier runs on this site's data already spent epsilon {self.carried_epsilon:.4f} (ledger store "
                f"{store.root}), leaving no room within the budget {budget.limit:g}; start a fresh budget only "
                f"knowingly (--fresh-budget)"
            )

    def facts(self) -> dict[str, Any]:
        """What ``metrics.json`` says about the store for this site."""
        return {
            "dir": str(self.store.root), "run_id": self.run_id, "fresh_budget": self.fresh,
            "carried_epsilon": self.carried_epsilon, "earlier_runs": len(self.earlier_runs),
        }  # fmt: skip

    def save(self) -> None:
        """Record the budget's ledger now (at a release, and at the end of a run)."""
        facts = self.budget.facts()
        self.store.write(self.run_id, self.site, self.cases, self.budget.ledger, {
            "epsilon": facts["epsilon"], "delta": facts["delta"], "budget": facts["budget"],
            "accountant": facts["accountant"], "fresh_budget": self.fresh,
        })  # fmt: skip


def _releases(events: list[dict[str, Any]]) -> int:
    """How many releases a ledger's events hold (an event stands for ``count`` releases, or ``steps`` DP steps)."""
    return sum(int(e.get("count", 0) or 0) + int(e.get("steps", 0) or 0) or 1 for e in events if isinstance(e, dict))


def _spent(events: list[dict[str, Any]], budget: PrivacyBudget) -> float:
    if not events:
        return 0.0
    return PrivacyLedger().epsilon_with([_event_object(e) for e in events], budget.delta, budget.accountant)
