"""The filter interface applied to what a site sends, and an ordered, fail-closed chain of filters.

A filter maps one outgoing :class:`~monai_fedpriv.fl.update.ModelUpdate` to a new one (it never mutates its input),
in the shape of MONAI's ``monai.fl.utils.filters.Filter`` and NVFlare's DXO filters: one small class, one
``__call__``. Filters that keep state across rounds (a random generator, an epsilon total) expose it through
``state_dict``/``load_state_dict`` so that a round checkpoint restores it.

The helpers at the bottom are shared by the concrete filters (:mod:`.selective`, :mod:`.svt`,
:mod:`.gaussian_update`): a seeded generator, Laplace draws from that generator, and flattening a delta dict into one
vector over its floating-point coordinates.
"""

from __future__ import annotations

import copy
import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from monai_fedpriv.errors import PrivacyConfigError, UpdateError
from monai_fedpriv.fl.update import ModelUpdate

__all__ = [
    "UpdateFilter",
    "FilterChain",
    "copy_update",
    "make_generator",
    "laplace",
    "shared_count",
    "top_k_mask",
    "report_epsilon",
]


class UpdateFilter(ABC):
    """Base class of everything that transforms an outgoing update (privatizers, sparsifiers).

    Subclasses validate their settings in ``__init__`` (raising :class:`~monai_fedpriv.errors.PrivacyConfigError`)
    and implement ``__call__``, which must return a new :class:`ModelUpdate` and leave its argument untouched.

    Example::

        class Identity(UpdateFilter):
            def __call__(self, update):
                return copy_update(update)
    """

    @abstractmethod
    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        """Return the filtered update (a new object)."""

    def state_dict(self) -> dict[str, Any]:
        """State to save with the round checkpoint (empty for stateless filters)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore what :meth:`state_dict` returned."""


class FilterChain(UpdateFilter):
    """Apply filters in order; fail closed.

    If any filter raises, or returns something that is not a new :class:`ModelUpdate`, the chain raises a
    ``RuntimeError`` naming the filter (the original exception is chained as ``__cause__``): there is no path on
    which the input, or a partly filtered update, comes back as if it had been filtered.

    Args:
        filters: the filters (any callables ``ModelUpdate -> ModelUpdate``), applied first to last.

    Example::

        chain = FilterChain([PercentileSharing(0.1, clip=1e-3), GaussianUpdatePrivacy(1.0, 1.0, generator=0)])
        sent = chain(update)
    """

    def __init__(self, filters: Iterable[Any]) -> None:
        self.filters = list(filters)
        for i, f in enumerate(self.filters):
            if not callable(f):
                raise PrivacyConfigError(f"filter #{i} of the chain is not callable: {f!r}.")

    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        current = update
        for i, f in enumerate(self.filters):
            name = f"filter #{i} ({type(f).__name__})"
            try:
                out = f(current)
            except Exception as exc:
                raise RuntimeError(
                    f"{name} failed on the update of {update.site!r} round {update.round}: {exc}"
                ) from exc
            if not isinstance(out, ModelUpdate):
                raise RuntimeError(f"{name} returned {type(out).__name__}, expected a ModelUpdate.")
            if out is current:
                raise RuntimeError(f"{name} returned its input object; filters must return a new ModelUpdate.")
            current = out
        if current is update:  # an empty chain: still never hand back the caller's object
            current = copy_update(update)
        return current

    def state_dict(self) -> dict[str, Any]:
        return {str(i): f.state_dict() if hasattr(f, "state_dict") else {} for i, f in enumerate(self.filters)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for i, f in enumerate(self.filters):
            if str(i) not in state:
                raise KeyError(f"FilterChain state lacks the entry of filter #{i} ({type(f).__name__}).")
            if hasattr(f, "load_state_dict"):
                f.load_state_dict(state[str(i)])

    def __len__(self) -> int:
        return len(self.filters)


# ----------------------------------------------------------------------------------------------------- helpers
def copy_update(update: ModelUpdate, **changes: Any) -> ModelUpdate:
    """A new update: fields named in ``changes`` are replaced, the others cloned (tensors) or deep-copied (meta)."""
    fields: dict[str, Any] = {}
    for name in ("site", "round", "n_samples", "local_steps"):
        fields[name] = getattr(update, name)
    for name in ("delta", "masks", "optimizer_state"):
        if name not in changes:
            value = getattr(update, name)
            fields[name] = None if value is None else {k: v.clone() for k, v in value.items()}
    if "meta" not in changes:
        fields["meta"] = copy.deepcopy(update.meta)
    fields.update(changes)
    return ModelUpdate(**fields)


def meta_with_privacy(update: ModelUpdate, privacy: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``update.meta`` whose ``"privacy"`` entry is replaced by ``privacy``."""
    meta = copy.deepcopy({k: v for k, v in update.meta.items() if k != "privacy"})
    meta["privacy"] = privacy
    return meta


def privacy_meta(update: ModelUpdate) -> dict[str, Any]:
    """A deep copy of ``update.meta["privacy"]`` (an empty dict when absent)."""
    priv = update.meta.get("privacy", {})
    if not isinstance(priv, dict):
        raise UpdateError(f"meta['privacy'] of {update.site!r} must be a dict, got {type(priv).__name__}.")
    return copy.deepcopy(priv)


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """An explicit CPU generator: the one given, one seeded with an int, or (``None``) one seeded from OS entropy.

    A seed an adversary knows makes the noise predictable and voids any privacy guarantee: seeds are for tests and
    reproducible experiments; deployments should pass ``None``.
    """
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise PrivacyConfigError(f"generator must be a CPU torch.Generator, got one on {generator.device}.")
        return generator
    if generator is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise PrivacyConfigError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}.")


def laplace(n: int, scale: float, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` draws of Lap(``scale``) from ``generator``, as ``scale * (E1 - E2)`` with E1, E2 ~ Exp(1) i.i.d."""
    e = torch.empty(2, n, dtype=dtype).exponential_(generator=generator)
    return (e[0] - e[1]).mul_(scale)


def shared_count(fraction: float, size: int) -> int:
    """Number of coordinates a fraction ``q`` of ``size`` means: ``round(q * size)``, at least 1 (0 if size is 0)."""
    if size <= 0:
        return 0
    return min(size, max(1, int(math.floor(fraction * size + 0.5))))


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise PrivacyConfigError(f"fraction must be a number in (0, 1], got {fraction!r}.")
    return float(fraction)


def check_positive(name: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PrivacyConfigError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def float_keys(delta: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors (the coordinates filters act on), in the dict's order."""
    return [k for k, v in delta.items() if v.is_floating_point()]


def flatten(delta: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """The tensors of ``keys`` concatenated into one CPU vector (float64 if any of them is, else float32)."""
    if not keys:
        return torch.zeros(0, dtype=torch.float64)
    dtype = torch.float64 if any(delta[k].dtype == torch.float64 for k in keys) else torch.float32
    return torch.cat([delta[k].detach().reshape(-1).to("cpu", dtype) for k in keys])


def unflatten(
    values: torch.Tensor, mask: torch.Tensor, update: ModelUpdate, keys: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a flat value vector and boolean mask back into per-key tensors shaped like ``update.delta``.

    Unshared coordinates are set to zero. Non-floating tensors (integer buffers) are never shared: zero delta and an
    all-False mask.
    """
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype))
    sizes = [update.delta[k].numel() for k in keys]
    value_parts = dict(zip(keys, values.split(sizes), strict=True))
    mask_parts = dict(zip(keys, mask.split(sizes), strict=True))
    delta: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for k, v in update.delta.items():
        if k not in value_parts:
            delta[k] = torch.zeros_like(v)
            masks[k] = torch.zeros(v.shape, dtype=torch.bool, device=v.device)
            continue
        delta[k] = value_parts[k].reshape(v.shape).to(device=v.device, dtype=v.dtype)
        masks[k] = mask_parts[k].reshape(v.shape).to(v.device)
    return delta, masks


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``score``; ties at the cut go to the lowest indices."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if k <= 0:
        return mask
    cut = torch.topk(score, k, sorted=False).values.min()
    mask |= score > cut
    need = k - int(mask.sum())
    tied = torch.nonzero(score == cut).reshape(-1)  # ascending indices
    mask[tied[:need]] = True
    return mask


def input_mask(update: ModelUpdate, keys: list[str]) -> torch.Tensor | None:
    """The update's masks over ``keys`` flattened like :func:`flatten`, or ``None`` for a dense update."""
    if update.masks is None:
        return None
    missing = [k for k in keys if k not in update.masks]
    if missing:
        raise UpdateError(f"sparse update of {update.site!r} has no mask for keys {missing[:5]}.")
    if not keys:
        return torch.zeros(0, dtype=torch.bool)
    return torch.cat([update.masks[k].detach().reshape(-1).to("cpu", torch.bool) for k in keys])


def steps_divisor(update: ModelUpdate, normalise: bool, who: str) -> float:
    """``N^(local)`` of Li et al. Alg. 2 line 2 (1.0 when normalisation is off); a site with no steps is an error."""
    if not normalise:
        return 1.0
    if update.local_steps <= 0:
        raise UpdateError(
            f"{who}: update of {update.site!r} round {update.round} has local_steps={update.local_steps}; "
            f"cannot normalise by the number of local iterations."
        )
    return float(update.local_steps)


def report_epsilon(priv: dict[str, Any], ledger: Any | None, delta: float | None = None) -> None:
    """Set ``priv["epsilon"]`` (and ``priv["delta"]``) to the site's cumulative epsilon *after* this filter's release.

    Upstream, the DP-SGD budget handler writes ``epsilon``/``delta``/``accountant`` into ``meta["privacy"]`` before
    the share filters run; a filter that then records into the same ledger would leave that figure one release
    short. This recomputes it from the ledger, so that the reported epsilon covers everything recorded so far:

    * a ``delta`` in ``priv`` (from upstream) or given here: ``ledger.epsilon(delta, accountant)``, the ledger's
      composition of every event (DP-SGD steps, Gaussian and pure releases);
    * no delta and a ledger holding only pure events: their sum, with ``delta = 0`` (basic composition);
    * no delta and Gaussian events in the ledger: nothing is set (an epsilon needs a delta).

    ``priv`` is modified in place. Without a ledger nothing is changed (the caller composes by hand).
    """
    if ledger is None or not callable(getattr(ledger, "epsilon", None)):
        return
    if priv.get("delta"):
        delta = float(priv["delta"])
    if delta is not None:
        priv["epsilon"] = float(ledger.epsilon(delta, priv.get("accountant") or "rdp"))
        priv["delta"] = delta
        return
    events = getattr(ledger, "events", None)
    if events is not None and all(e.get("kind") == "pure" for e in events):
        priv["epsilon"] = float(sum(e["epsilon"] * e["count"] for e in events))
        priv["delta"] = 0.0
