"""What the server's strategy tells one site for one round (:class:`RoundInstruction`), carried with the global
model: how much local work to do and how (FedProx's proximal weight). Decoded from untrusted JSON with every field
typed and bounded, so a site never acts on a value it cannot check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.update import int_problem, shown

__all__ = ["MAX_CUT_BLOCK", "MAX_PROX_MU", "PHASES", "RoundInstruction"]

MAX_PROX_MU = 1.0e6
MAX_CUT_BLOCK = 16
MAX_EPOCHS = 10_000
#: what a site does in a round: train and send its update; send its dataset upload once (FedReplay); train across
#: the cut with the server part, batch by batch (SplitNN); train the generator it is handed (CWT+Replay)
PHASES = ("train", "upload", "split", "generator")


@dataclass(frozen=True)
class RoundInstruction:
    """One site's instructions for one round.

    Args:
        local_steps: exactly this many logical optimiser steps this round; ``None``: the run's local work
            (``--local-epochs`` / ``--local-steps``).
        whole_batches: train ``floor(|D_k| / b)`` steps, the full batches of the site's data set (cyclic weight
            transfer, seed 004); overrides the run's local work.
        prox_mu: FedProx's proximal weight ``mu`` (Li et al. 2020): ``mu (w - w_global)`` is added to every step's
            gradient; ``0`` trains exactly as FedAvg.
        phase: one of :data:`PHASES`.
        cut_block: where the network is cut (``upload``: the encoder's blocks; ``split``: the site's part), or
            ``None``.
        epochs: passes over the site's items (``generator``: CWT+Replay's local generator epochs ``M``), or ``None``.
    """

    kind: ClassVar[str] = "instruction"

    local_steps: int | None = None
    whole_batches: bool = False
    prox_mu: float = 0.0
    phase: str = "train"
    cut_block: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.phase, str) or self.phase not in PHASES:
            raise UpdateError(f"round instruction: phase is {shown(self.phase)}, expected one of {list(PHASES)}.")
        if self.cut_block is not None and (problem := int_problem("cut_block", self.cut_block, minimum=1)):
            raise UpdateError(f"round instruction: {problem}.")
        if self.epochs is not None and (problem := int_problem("epochs", self.epochs, minimum=1)):
            raise UpdateError(f"round instruction: {problem}.")
        if self.epochs is not None and self.epochs > MAX_EPOCHS:
            raise UpdateError(f"round instruction: epochs is {self.epochs}, at most {MAX_EPOCHS}.")
        if self.cut_block is not None and self.cut_block > MAX_CUT_BLOCK:
            raise UpdateError(f"round instruction: cut_block is {self.cut_block}, at most {MAX_CUT_BLOCK}.")
        if self.local_steps is not None and (problem := int_problem("local_steps", self.local_steps, minimum=1)):
            raise UpdateError(f"round instruction: {problem}.")
        if not isinstance(self.whole_batches, bool):
            raise UpdateError(f"round instruction: whole_batches is {shown(self.whole_batches)}, expected a bool.")
        if self.local_steps is not None and self.whole_batches:
            raise UpdateError("round instruction: local_steps and whole_batches exclude each other.")
        mu = self.prox_mu
        number = isinstance(mu, (int, float)) and not isinstance(mu, bool)
        if not number or not (isinstance(mu, float) and math.isfinite(mu) or isinstance(mu, int) and abs(mu) < 2**53) \
                or not 0 <= mu <= MAX_PROX_MU:  # fmt: skip
            raise UpdateError(f"round instruction: prox_mu is {shown(mu)}, expected a number in [0, {MAX_PROX_MU:g}].")

    @property
    def default(self) -> bool:
        """Whether the instruction asks for nothing beyond the run's own settings."""
        return self == RoundInstruction()

    def steps_for(self, n_items: int, batch_size: int) -> int | None:
        """The logical steps this instruction asks of a site holding ``n_items`` training items in batches of
        ``batch_size`` (``None``: the run's local work)."""
        if self.whole_batches:
            return max(1, n_items // max(1, batch_size))
        return self.local_steps

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v != getattr(RoundInstruction, k, None) or k == "prox_mu"}

    @classmethod
    def from_json(cls, raw: Any, where: str = "round instruction") -> RoundInstruction:
        """An instruction from decoded JSON (an object of known fields only), or :class:`UpdateError` naming the
        field."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise UpdateError(f"{where}: expected an object, got {shown(raw)}.")
        unknown = sorted(set(raw) - {"local_steps", "whole_batches", "prox_mu", "phase", "cut_block", "epochs"})
        if unknown:
            raise UpdateError(f"{where}: unknown fields {[shown(k) for k in unknown[:5]]}.")
        try:
            return cls(**dict(raw))
        except UpdateError as exc:
            raise UpdateError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None

