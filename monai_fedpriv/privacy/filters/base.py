"""The filter interface applied to what a site sends, and the one ordered, fail-closed chain of filters.

A filter maps one outgoing :class:`~monai_fedpriv.fl.update.ModelUpdate` to a new one (it never mutates its input),
in the shape of MONAI's ``monai.fl.utils.filters.Filter`` and NVFlare's DXO filters: one small class, one
``__call__``. Filters that keep state across rounds (a random generator, a round counter) expose it through
``state_dict``/``load_state_dict`` so that a round checkpoint restores it.

**Coverage.** Each filter declares which fields of which message kind it protects (``covers``:
``"update.delta"``, ``"update.optimizer_state"``; a bare field name is a field of ``"update"``, the kind a site's
trainer sends every round). Every tensor field of every kind a site can send is listed in :data:`SENT_FIELDS`; a
new kind of message (per-batch tensors, a dataset upload) is added there with its fields, and is then under the same
rule. As soon as one filter of a chain protects any field of a kind (it privatizes or limits what is shared), every
tensor field of that kind the site sends must be covered by some filter of the chain: :meth:`FilterChain.check_coverage`
refuses the combination when the site is built, and :meth:`FilterChain.__call__` checks the outgoing update again, so
an unprotected tensor never leaves a site next to a privacy claim. (Example: ``--momentum aggregate`` sends the
optimiser moments; an SVT filter on the weight delta does not cover them, so the combination is refused; under DP-SGD
the moments are post-processing of noised gradients and DP-SGD covers them.)
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from monai_fedpriv.errors import PrivacyConfigError, UpdateError
from monai_fedpriv.fl.messages import TENSOR_MESSAGES
from monai_fedpriv.fl.update import ModelUpdate

__all__ = [
    "SENT_FIELDS",
    "TENSOR_FIELDS",
    "FilterChain",
    "UpdateFilter",
    "copy_update",
    "covered_fields",
    "handled_kinds",
    "meta_with_privacy",
    "privacy_meta",
    "qualified",
]

#: Every tensor field of every message kind a site can send (``masks`` travel with, and are covered with, delta):
#: the round's update, SplitNN's per-batch activations and gradients, a dataset upload's latents and labels.
SENT_FIELDS: dict[str, tuple[str, ...]] = {
    ModelUpdate.kind: ("delta", "optimizer_state"),
    **{kind: cls.tensor_fields for kind, cls in TENSOR_MESSAGES.items()},
}
#: The same as ``"kind.field"`` names.
TENSOR_FIELDS = tuple(f"{kind}.{name}" for kind, names in SENT_FIELDS.items() for name in names)


def qualified(name: str) -> str:
    """``"kind.field"`` of a covered or sent field name (a bare name is a field of an update)."""
    return name if "." in name else f"{ModelUpdate.kind}.{name}"


class UpdateFilter(ABC):
    """Base class of everything that transforms an outgoing update (privatizers, sparsifiers, reporters, audits).

    Subclasses validate their settings in ``__init__`` (raising :class:`~monai_fedpriv.errors.PrivacyConfigError`),
    declare the fields they protect in ``covers`` and implement ``__call__``, which must return a new
    :class:`ModelUpdate` and leave its argument untouched.

    Example::

        class Identity(UpdateFilter):
            def __call__(self, update):
                return copy_update(update)
    """

    #: fields of the update this filter protects (privatizes or limits); empty for reporters and audits.
    covers: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        """Return the filtered update (a new object)."""

    def state_dict(self) -> dict[str, Any]:
        """State to save with the round checkpoint (empty for stateless filters)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore what :meth:`state_dict` returned."""


def covered_fields(f: Any) -> frozenset[str]:
    """The fields a filter declares it protects (any callable may declare ``covers``; default none)."""
    covers = frozenset(qualified(str(name)) for name in getattr(f, "covers", frozenset()))
    unknown = set(covers) - set(TENSOR_FIELDS)
    if unknown:
        raise PrivacyConfigError(f"{type(f).__name__}.covers names unknown message fields {sorted(unknown)}; "
                                 f"known: {list(TENSOR_FIELDS)}.")  # fmt: skip
    return covers


def handled_kinds(f: Any) -> frozenset[str]:
    """The message kinds a filter acts on: those of the fields it covers, or an update's for a filter that covers
    nothing (reporters and audits of the round's update)."""
    return frozenset(name.split(".", 1)[0] for name in covered_fields(f)) or frozenset({ModelUpdate.kind})


class FilterChain(UpdateFilter):
    """Apply filters in order; fail closed.

    If any filter raises, or returns something that is not a new :class:`ModelUpdate`, the chain raises a
    ``RuntimeError`` naming the filter (the original exception is chained as ``__cause__``): there is no path on
    which the input, or a partly filtered update, comes back as if it had been filtered. The result is then checked
    against the chain's coverage (see the module docstring).

    Args:
        filters: the filters (any callables ``ModelUpdate -> ModelUpdate``), applied first to last.

    Example::

        chain = FilterChain([PercentileSharing(0.1, clip=1e-3)])
        chain.check_coverage({"delta"})
        sent = chain(update)
    """

    def __init__(self, filters: Iterable[Any] = ()) -> None:
        self.filters: list[Any] = []
        self.extend(filters)

    def extend(self, filters: Iterable[Any]) -> None:
        """Append filters (validated: each must be callable and declare only known fields)."""
        for f in filters:
            if not callable(f):
                raise PrivacyConfigError(f"filter #{len(self.filters)} of the chain is not callable: {f!r}.")
            covered_fields(f)
            self.filters.append(f)

    @property
    def covers(self) -> frozenset[str]:  # type: ignore[override]
        out: frozenset[str] = frozenset()
        for f in self.filters:
            out = out | covered_fields(f)
        return out

    @property
    def protects(self) -> bool:
        """Whether any filter of the chain protects something (then every sent field of its kind must be covered)."""
        return bool(self.covers)

    def protects_kind(self, kind: str) -> bool:
        """Whether the chain protects some field of messages of ``kind`` (then it must cover all of them): a
        message of one kind is judged by the protection claimed for that kind (FedReplay's latent mechanism makes
        no claim about the encoder site's weight update, which says for itself what protects it)."""
        return any(name.startswith(f"{kind}.") for name in self.covers)

    def check_coverage(self, sent_fields: Iterable[str]) -> None:
        """Refuse a chain that protects some of what a site sends but not all of it.

        Args:
            sent_fields: the tensor fields the site will send (``"update.delta"``, and ``"update.optimizer_state"``
                when optimiser moments are aggregated; bare names are fields of an update).

        Raises:
            PrivacyConfigError: naming each uncovered field and the filters present.
        """
        sent = {qualified(name) for name in sent_fields}
        unknown = sent - set(TENSOR_FIELDS)
        if unknown:  # a field no filter could ever declare: refused whether or not the chain protects anything
            raise PrivacyConfigError(f"the site would send {sorted(unknown)}, which are not known message fields.")
        missing = sorted(n for n in sent - self.covers if self.protects_kind(n.split(".", 1)[0]))
        if missing:
            names = [f"{type(f).__name__} (covers {sorted(covered_fields(f)) or 'nothing'})" for f in self.filters]
            hint = (
                " The optimiser moments of --momentum aggregate are covered only by DP-SGD (--privacy), whose "
                "moments are post-processing of noised gradients; use --momentum restart or local, or add DP-SGD."
                if qualified("optimizer_state") in missing
                else ""
            )
            raise PrivacyConfigError(
                f"the site would send {missing} that no update filter covers, next to filters that protect "
                f"{sorted(self.covers)}: {', '.join(names)}.{hint}"
            )

    def require_covered(self, kind: str, unprotected: bool, flag: str) -> None:
        """Refuse to send messages of ``kind`` whose fields the chain does not all cover, unless the site opted in
        to sending them unprotected (``flag`` names the opt-in in the refusal).

        Raises:
            PrivacyConfigError: naming the uncovered fields and ``flag``.
        """
        missing = sorted({f"{kind}.{name}" for name in SENT_FIELDS[kind]} - self.covers)
        if missing and not unprotected:
            raise PrivacyConfigError(
                f"the site would send {missing} that no filter covers; add the mechanism that protects them, or pass "
                f"{flag} to send them unprotected (the run's report and metrics.json then say so)."
            )

    def __call__(self, update: Any) -> Any:
        """Filter one outgoing message (an update, or any kind of :data:`SENT_FIELDS`): each filter that acts on
        its kind, in order; then the coverage check."""
        kind = getattr(update, "kind", None)
        if kind not in SENT_FIELDS:
            raise RuntimeError(f"a site cannot send a {type(update).__name__} (kind {kind!r}); nothing was sent.")
        current = update
        for i, f in enumerate(self.filters):
            if kind not in handled_kinds(f):
                continue
            name = f"filter #{i} ({type(f).__name__})"
            try:
                out = f(current)
            except Exception as exc:
                raise RuntimeError(
                    f"{name} failed on the {kind} of {update.site!r} round {update.round}: {exc}"
                ) from exc
            if type(out) is not type(current):
                raise RuntimeError(f"{name} returned {type(out).__name__}, expected a {type(current).__name__}.")
            if out is current:
                raise RuntimeError(f"{name} returned its input object; filters must return a new message.")
            current = out
        if current is update:  # an empty chain: still never hand back the caller's object
            current = copy_update(update) if isinstance(update, ModelUpdate) else copy.deepcopy(update)
        self._enforce(current)
        return current

    def _enforce(self, update: Any) -> None:
        """The outgoing message carries no tensor field that the chain does not cover (when it protects any)."""
        if not self.protects_kind(update.kind):
            return
        present = {f"{update.kind}.{name}" for name in SENT_FIELDS[update.kind] if getattr(update, name) is not None}
        missing = sorted(present - self.covers)
        if missing:
            raise RuntimeError(
                f"the {update.kind} of {update.site!r} round {update.round} carries {missing}, which no filter "
                f"covers; nothing was sent."
            )

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
