"""What the update filters that release under the site's budget share (:class:`SparseVectorFilter`,
:class:`GaussianUpdatePrivacy`): the per-round release reserved in the site's one budget when the filter is built,
refused without a finite limit; noise from an explicit generator; and the state saved with the round checkpoint."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.accounting import PrivacyEvent
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters.base import UpdateFilter
from monai_fedpriv.privacy.noise import make_generator

__all__ = ["BudgetedRelease"]


class BudgetedRelease(UpdateFilter):
    """Base of the filters whose every round is one private release under the site's :class:`PrivacyBudget`.

    Subclasses name their reservation (``reservation``), describe one round's release (``event``) and call
    :meth:`_bind_budget` at the end of ``__init__``, once ``event`` can be computed.
    """

    #: the name of the filter's per-round release in the budget's reservations.
    reservation: ClassVar[str]
    #: how the filter's own settings lower one release's cost (the budget's refusal says it).
    budget_hint: ClassVar[str] = "lower the filter's epsilon"

    budget: PrivacyBudget
    generator: torch.Generator
    rounds: int

    @property
    @abstractmethod
    def event(self) -> PrivacyEvent:
        """One round's release, as the ledger records it."""

    def _bind_budget(self, budget: object, generator: torch.Generator | int | None) -> None:
        """Reserve one round's release in ``budget`` (refused without a finite limit, or if one round alone would
        pass it) and take the noise generator."""
        if not isinstance(budget, PrivacyBudget):
            raise PrivacyConfigError(f"budget must be the site's PrivacyBudget, got {type(budget).__name__}.")
        budget.require_limit(type(self).__name__)
        budget.reserve(self.reservation, self.event, self.budget_hint)
        self.budget = budget
        self.generator = make_generator(generator)
        self.rounds = 0

    def ledger_facts(self) -> dict[str, Any]:
        """The site's cumulative epsilon, delta and accountant after every release so far (for the update's meta)."""
        return {k: v for k, v in self.budget.facts().items() if k in ("epsilon", "delta", "accountant")}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "generator_state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("rounds", "generator_state"):
            if key not in state:
                raise KeyError(f"{type(self).__name__} state lacks required key {key!r}.")
        self.rounds = int(state["rounds"])
        self.generator.set_state(state["generator_state"])
