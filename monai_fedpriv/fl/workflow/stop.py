"""Typed stop decisions: a site's budget policy (:class:`StopPolicy`) and why a federation ended (:class:`Stop`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from monai_fedpriv.privacy.budget import StopPolicy

__all__ = ["Stop", "StopKind", "StopPolicy", "budget_stop_reason"]


class StopKind(str, Enum):
    """Why a federation ended before its last round."""

    ROUND_FAILED = "round_failed"  #: too few acceptable updates; the last good round stays
    BUDGET = "budget"  #: a site's budget ran out under ``stop_federation``
    ALL_STOPPED = "all_stopped"  #: every site has left


@dataclass
class Stop:
    """The end of a federation: the round, the kind and the reason (``metrics.json``'s ``stopped``)."""

    round: int
    kind: StopKind
    reason: str
    failed_round: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "reason": self.reason}
        if self.failed_round is not None:
            out["failed_round"] = self.failed_round
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None, kind: StopKind) -> Stop | None:
        if not raw:
            return None
        return cls(int(raw["round"]), kind, str(raw["reason"]), raw.get("failed_round"))


def budget_stop_reason(site: str) -> str:
    """Why a federation ends when ``site`` exhausts its budget under :attr:`StopPolicy.STOP_FEDERATION`."""
    return f"privacy budget of {site} exhausted (policy {StopPolicy.STOP_FEDERATION.value})"
