"""The simulated sites' budgets bound to a ledger store (:mod:`monai_fedpriv.privacy.ledger_store`): what the run
carries from earlier runs on the same cases, and what ``metrics.json`` and the fingerprint say about it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai_fedpriv.privacy.ledger_store import new_run_id

if TYPE_CHECKING:
    from monai_fedpriv.fl.simulator.site import SiteRuntime
    from monai_fedpriv.privacy.ledger_store import LedgerStore

__all__ = ["SiteLedgers"]


class SiteLedgers:
    """The run's identity in a ledger store and each site's binding to it.

    Args:
        store: the :class:`~monai_fedpriv.privacy.ledger_store.LedgerStore`, or ``None`` (this run's ledgers only).
        fresh: start every budget at zero although the store holds earlier spending on the same cases.
    """

    def __init__(self, store: LedgerStore | None, fresh: bool = False) -> None:
        self.store = store
        self.fresh = bool(fresh)
        self.run_id = new_run_id()  # replaced by the checkpoint's on resume
        self.facts: dict[str, dict[str, Any]] = {}

    def describe(self) -> dict[str, Any] | None:
        """What the run fingerprint holds: a resume keeps the store and the fresh-budget choice it started with."""
        if self.store is None:
            return None
        return {"dir": str(Path(self.store.root).resolve()), "fresh_budget": self.fresh}

    def bind(
        self,
        sites: Mapping[str, SiteRuntime],
        cases: Mapping[str, Sequence[dict[str, Any]]],
        resumed: bool,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """Bind every site's budget (see :meth:`SiteRuntime.bind_ledger_store`); ``log`` hears of carried epsilon."""
        if self.store is None:
            return
        for name, site in sites.items():
            facts = site.bind_ledger_store(self.store, self.run_id, list(cases[name]), fresh=self.fresh,
                                           resumed=resumed)  # fmt: skip
            if facts is None:
                continue
            self.facts[name] = facts
            if facts["carried_epsilon"] > 0 and log is not None:
                log(f"{name}: earlier runs on its data spent epsilon {facts['carried_epsilon']:.4f} (ledger store "
                    f"{facts['dir']}); its budget counts it")  # fmt: skip

    def save(self, sites: Mapping[str, SiteRuntime]) -> None:
        """Record every site's ledger now (the end of a run)."""
        if self.store is not None:
            for site in sites.values():
                site.save_ledgers()

    def summary(self) -> dict[str, Any] | None:
        """``metrics.json``'s ``ledger_store``: where, which run, whether fresh, and per site what it carried."""
        if self.store is None or not self.facts:
            return None
        return {
            "dir": str(self.store.root), "run_id": self.run_id, "fresh_budget": self.fresh,
            "sites": {n: {k: f[k] for k in ("carried_epsilon", "earlier_runs")} for n, f in self.facts.items()},
        }  # fmt: skip
