"""Message kinds beyond a round's weight update: what split learning and generative replay send.

* :class:`Activations` and :class:`Gradients` travel once per batch in SplitNN (Vepakomma et al. 2018, "Split
  learning for health"): a site's cut-layer features forward and the server's answer; the gradient with respect to
  the server's output back and the gradient with respect to the cut-layer features in return.
* :class:`LatentUpload` is a dataset sent once: FedReplay's latents of a site's training items with their labels
  (seed 004, Algorithm 2).
* :class:`GeneratorState` is CWT+Replay's auxiliary generator with the codes of every item it was trained on so far
  (seed 004, Algorithm 1): a site returns it after its visit, the server hands it to the next site.

Each has a ``kind`` (the codec's registry, :mod:`monai_fedpriv.fl.codec`) and ``tensor_fields`` (the fields listed in
:data:`monai_fedpriv.privacy.filters.base.SENT_FIELDS`, so the filter chain's coverage rule holds for them as for
updates: a field that leaves a site is covered by a filter or the site says plainly that it is unprotected).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.update import int_problem, site_problem, tensor_bytes

__all__ = [
    "Activations", "BatchTensors", "GeneratorState", "Gradients", "LatentUpload", "TENSOR_MESSAGES",
    "check_message_fields",
]  # fmt: skip


@dataclass
class BatchTensors:
    """Tensors of one batch exchanged across a cut (``step``: the site's batch counter within the round)."""

    kind: ClassVar[str] = "batch"
    tensor_fields: ClassVar[tuple[str, ...]] = ("tensors",)

    site: str
    round: int
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"tensors": self.tensors}

    @classmethod
    def build(cls, site: str, rnd: int, step: int, fields: dict[str, dict[str, torch.Tensor]],
              meta: dict[str, Any]) -> BatchTensors:  # fmt: skip
        return cls(site, rnd, step, fields["tensors"], meta)

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.tensors.values())


@dataclass
class Activations(BatchTensors):
    """Cut-layer features forward (site to server), or the server part's output (server to site)."""

    kind: ClassVar[str] = "activations"


@dataclass
class Gradients(BatchTensors):
    """A gradient across the cut: of the loss w.r.t. the server's output (site to server) or w.r.t. the cut-layer
    features (server to site)."""

    kind: ClassVar[str] = "gradients"


@dataclass
class LatentUpload:
    """A site's one-time dataset upload: ``latents[i]`` is item ``i``'s encoding, ``labels[i]`` its label.

    ``meta`` holds the facts the site reports (its privacy facts, whether the upload is protected); the server trusts
    none of it beyond the site's own record.
    """

    kind: ClassVar[str] = "latents"
    tensor_fields: ClassVar[tuple[str, ...]] = ("latents", "labels")
    field_keys: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents",), "labels": ("labels",)}

    site: str
    round: int
    latents: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    step: int = 0

    def fields(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"latents": {"latents": self.latents}, "labels": {"labels": self.labels}}

    @classmethod
    def build(cls, site: str, rnd: int, step: int, fields: dict[str, dict[str, torch.Tensor]],
              meta: dict[str, Any]) -> LatentUpload:  # fmt: skip
        return cls(site, rnd, fields["latents"]["latents"], fields["labels"]["labels"], meta, step)

    @property
    def items(self) -> int:
        return int(self.latents.shape[0]) if self.latents.dim() else 0

    def nbytes(self) -> int:
        return tensor_bytes(self.latents) + tensor_bytes(self.labels)


@dataclass
class GeneratorState:
    """CWT+Replay's generator weights and the accumulated codes ``e`` (which decode to image and mask pairs)."""

    kind: ClassVar[str] = "generator"
    tensor_fields: ClassVar[tuple[str, ...]] = ("weights", "codes")
    field_keys: ClassVar[dict[str, tuple[str, ...]]] = {"codes": ("codes",)}

    site: str
    round: int
    weights: dict[str, torch.Tensor]
    codes: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    step: int = 0

    def fields(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"weights": self.weights, "codes": {"codes": self.codes}}

    @classmethod
    def build(cls, site: str, rnd: int, step: int, fields: dict[str, dict[str, torch.Tensor]],
              meta: dict[str, Any]) -> GeneratorState:  # fmt: skip
        return cls(site, rnd, fields["weights"], fields["codes"]["codes"], meta, step)

    @property
    def items(self) -> int:
        return int(self.codes.shape[0]) if self.codes.dim() else 0

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.weights.values()) + tensor_bytes(self.codes)


#: ``kind -> class`` of the messages :mod:`monai_fedpriv.fl.tensor_codec` encodes
TENSOR_MESSAGES: dict[str, Any] = {cls.kind: cls for cls in (Activations, Gradients, LatentUpload, GeneratorState)}


def check_message_fields(message: Any) -> None:
    """Typed fields of a tensor message: a safe site name, ``round`` >= 1, ``step`` >= 0, finite tensors, and for an
    upload as many labels as latents (``UpdateError`` naming the site and the field)."""
    problem = site_problem(message.site)
    who = f"{message.kind} message" if problem else f"{message.kind} message from {message.site!r}"
    problem = problem or int_problem("round", message.round, minimum=1) or int_problem("step", message.step)
    if problem is None and not isinstance(message.meta, dict):
        problem = f"meta field is a {type(message.meta).__name__}, expected a dict"
    if problem is None:
        for name, tensors in message.fields().items():
            for key, t in tensors.items():
                if not isinstance(t, torch.Tensor):
                    problem = f"{name} ({key!r}) is a {type(t).__name__}, expected a tensor"
                elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    problem = f"{name} ({key!r}) contains NaN or Inf values"
                if problem:
                    break
    if problem is None and isinstance(message, GeneratorState) and (
        message.codes.dtype != torch.int64 or message.codes.dim() < 2 or (message.codes.numel() and (
            int(message.codes.min()) < 0 or int(message.codes.max()) >= 2**20))):  # fmt: skip
        problem = f"codes {list(message.codes.shape)} {message.codes.dtype} should be int64 indices, one grid per item"
    if problem is None and isinstance(message, LatentUpload):
        if message.latents.dim() < 2 or message.labels.dim() < 1 or message.labels.shape[0] != message.items:
            problem = (f"latents {list(message.latents.shape)} and labels {list(message.labels.shape)} should hold "
                       f"one row per item")  # fmt: skip
    if problem is not None:
        raise UpdateError(f"{who}: {problem}.")
