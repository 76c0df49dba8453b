"""Bounded work claims: the server knows the work it asked of each site and how many training samples the site
declared when it joined, and refuses an update that claims more, so that weighting by steps or samples can never
hand the aggregate to one site.

A site counts ``local_steps`` as the logical optimiser steps of its round (``FederatedSync``). Without DP-SGD that is
one per iteration at most (a round that ends inside a logical batch finishes that step in place of one of the next
round's iterations), and fewer when the budget stops a round early; the engine runs ``local_steps`` iterations a round,
or ``local_epochs`` epochs of ``ceil(n_samples / batch_size)`` iterations, so that is the bound. Under DP-SGD, an
empty Poisson draw takes a noise-only step without an iteration (``NoiseOnEmptyDataLoader``), so an honest site may
take more steps than iterations, a random number of them: a draw is empty with probability ``(1 - q)^n <= e^-B`` for
an expected batch ``B = qn >= 1``, at most ``e^-1``. The bound then allows as many steps again plus
:data:`DP_EXTRA_STEPS`: the empty draws of a round of ``L`` iterations are negative binomial, and more than ``L + 32``
of them has a probability below 2e-9 for any ``L`` (at most ``e^-1`` per draw; below 1e-28 for an expected batch of
2). A claim within that bound is accepted, but its *weight* is the steps the server asked for at most
(:attr:`WorkBound.weight_steps`: a noise-only step carries no data, and so no site can outweigh an honest site that
did all the work asked of it); the claim is recorded next to it.

Example::

    bound = WorkBound(max_steps=steps_per_round(40, batch_size=4, local_epochs=1), n_samples=40)
    claim_problem(update, bound)   # "claims 1e+12 local steps, but the server asked for at most 10"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.fl.instruction import RoundInstruction
    from monai_fedpriv.fl.nvflare.settings import JobSettings
    from monai_fedpriv.fl.update import ModelUpdate

__all__ = [
    "DP_EXTRA_STEPS", "WorkBound", "asked_iterations", "bound_for", "bundle_work", "claim_problem", "instructed_bound",
    "steps_per_round", "work_bounds",
]  # fmt: skip

DP_EXTRA_STEPS = 32


@dataclass(frozen=True)
class WorkBound:
    """The most one site may claim in a round.

    Args:
        max_steps: the most logical optimiser steps an honest site can take for the work asked (``None``: not
            bounded); a claim beyond it is rejected.
        n_samples: training samples the site declared when it joined (``None``: not bounded).
        weight_steps: the iterations the server asked for: an accepted claim above it is weighted as this many
            steps (``None``: as claimed).
    """

    max_steps: int | None
    n_samples: int | None = None
    weight_steps: int | None = None


def steps_per_round(
    n_samples: int,
    batch_size: int,
    local_epochs: int | None = None,
    local_steps: int | None = None,
    dp_sgd: bool = False,
) -> int:
    """The most logical optimiser steps an honest site takes in a round: the iterations its engine runs
    (``local_steps``, else ``local_epochs`` epochs of ``ceil(n_samples / batch_size)`` batches, as the simulator and
    the NVIDIA FLARE client build a site), and under DP-SGD (``dp_sgd``) as many again plus :data:`DP_EXTRA_STEPS`
    for the noise-only steps of empty Poisson draws (see the module docstring)."""
    iterations = asked_iterations(n_samples, batch_size, local_epochs, local_steps)
    return 2 * iterations + DP_EXTRA_STEPS if dp_sgd else iterations


def asked_iterations(
    n_samples: int, batch_size: int, local_epochs: int | None = None, local_steps: int | None = None
) -> int:
    """The iterations the server asks of a site a round: ``local_steps``, else ``local_epochs`` epochs of
    ``ceil(n_samples / batch_size)`` batches."""
    if local_steps is not None:
        return int(local_steps)
    if batch_size < 1:
        raise ValueError(f"batch_size should be >= 1, got {batch_size!r}.")
    return int(local_epochs or 1) * -(-int(n_samples) // int(batch_size))


def bound_for(
    n_samples: int | None, batch_size: int, local_epochs: int | None, local_steps: int | None, dp_sgd: bool
) -> WorkBound:
    """The :class:`WorkBound` of a site that declared ``n_samples`` (``None``: not yet; then only ``local_steps``
    bounds its steps)."""
    if local_steps is None and n_samples is None:
        return WorkBound(None, None)
    n = int(n_samples or 0)
    return WorkBound(
        max_steps=steps_per_round(n, batch_size, local_epochs, local_steps, dp_sgd),
        n_samples=n_samples,
        weight_steps=asked_iterations(n, batch_size, local_epochs, local_steps),
    )


def instructed_bound(
    n_samples: int | None, batch_size: int, local_epochs: int | None, local_steps: int | None, dp_sgd: bool,
    instruction: RoundInstruction,
) -> WorkBound:
    """The :class:`WorkBound` of a site told ``instruction`` this round: its step count when it names one
    (``whole_batches``: ``floor(n_samples / batch_size)``, unbounded while the site has declared no samples), else the
    run's ``local_epochs`` / ``local_steps``."""
    if instruction.whole_batches and n_samples is None:
        return WorkBound(None, None)
    steps = instruction.steps_for(int(n_samples or 0), batch_size)
    if steps is None:
        return bound_for(n_samples, batch_size, local_epochs, local_steps, dp_sgd)
    return bound_for(n_samples, batch_size, None, steps, dp_sgd)


def _count(value: int) -> str:
    return f"{value:.3g}" if value >= 10**6 else str(value)


def claim_problem(update: ModelUpdate, bound: WorkBound | None) -> str | None:
    """Why ``update`` claims more work than ``bound`` allows, or ``None`` (fields already typed by
    :func:`~monai_fedpriv.fl.update.check_fields`)."""
    if bound is None:
        return None
    if bound.max_steps is not None and update.local_steps > bound.max_steps:
        return f"claims {_count(update.local_steps)} local steps, but the server asked for at most {bound.max_steps}"
    if bound.n_samples is not None and update.n_samples > bound.n_samples:
        return (
            f"claims {_count(update.n_samples)} training samples, but declared {bound.n_samples} when it joined the "
            f"federation"
        )
    return None


def bundle_work(bundle: BundleSpec, seed: int) -> tuple[int, bool]:
    """``(training batch size, whether it trains with DP-SGD)`` of ``bundle`` (``train#dataloader#batch_size`` and
    the ``dp`` id of ``dp.json``), read as a site reads them."""
    from monai_fedpriv.bundle.loader import load_bundle, parser_get

    parser = load_bundle(bundle, {"device": "$torch.device('cpu')", "seed": seed})
    return int(parser.get_parsed_content("train#dataloader#batch_size")), parser_get(parser, "dp") is not None


def work_bounds(
    settings: JobSettings, batch_size: int, dp_sgd: bool, declared: Mapping[str, int],
    instructions: Mapping[str, RoundInstruction] | None = None,
) -> dict[str, WorkBound]:
    """The bounds of an NVIDIA FLARE job's sites told ``instructions`` this round (default: every site, the run's
    local work): their instruction's steps, else the job's local steps (or local epochs of the batches of each
    site's samples), and the samples each site declared with its first *accepted* update (``declared``, recorded by
    the run loop only after the round screened that update, kept in the server's checkpoint). The job's own data
    lists are not a bound: a deployed site trains on its own ``$MONAI_FEDPRIV_DATALIST``.

    A site that has not declared yet has no sample bound (and, under ``local_epochs``, no step bound): in that round
    :class:`~monai_fedpriv.fl.server.round.ServerRound` weights it as the median of the other accepted sites at most,
    so a first update cannot take the aggregate either."""
    from monai_fedpriv.fl.instruction import RoundInstruction

    asked = instructions if instructions is not None else {site: RoundInstruction() for site in settings.sites}
    return {
        site: instructed_bound(declared.get(site), batch_size, settings.local_epochs, settings.local_steps, dp_sgd,
                               instruction)
        for site, instruction in asked.items()
    }  # fmt: skip
