"""The server's side of a round in which sites send a dataset once (FedReplay's latents with their labels): what a
training-at-the-server phase must offer the run loop (:class:`ServerTraining`), and the screening of the uploads,
which trusts nothing a site sent beyond its own entry (one upload per asked site, the round in progress, the same
item shape as every other site's, labels in range)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_fedpriv.fl.messages import LatentUpload

__all__ = ["MAX_UPLOAD_ITEMS", "ServerTraining", "screen_uploads", "upload_facts"]

MAX_UPLOAD_ITEMS = 1_000_000


class ServerTraining(ABC):
    """What the server keeps of the sites' uploads and does with it: FedReplay's pool and the training of its
    primary model; CWT+Replay's generator, handed from site to site."""

    def screen(self, uploads: Sequence[Any], asked: Sequence[str], rnd: int) -> tuple[list[Any], dict[str, str]]:
        """``(accepted, {site: why rejected})`` of one upload round (default: :func:`screen_uploads`)."""
        return screen_uploads(uploads, asked, rnd)

    def facts(self, upload: Any, wire_bytes: int | None) -> dict[str, Any]:
        """``metrics.json``'s ``upload[<site>]`` entry (default: :func:`upload_facts`)."""
        return upload_facts(upload, wire_bytes)

    @abstractmethod
    def receive(self, uploads: Sequence[Any]) -> None:
        """Keep the round's accepted uploads."""

    @abstractmethod
    def train(self, rnd: int, weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One server round on the pool from ``weights``: ``(new weights, facts for metrics.json)``."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The pool and the trainer's state, for the run's checkpoint."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def upload_facts(upload: LatentUpload, wire_bytes: int | None) -> dict[str, Any]:
    """``metrics.json``'s ``upload[<site>]``: what was sent, how much, and whether a mechanism protected it (the
    site's own report of its privacy facts, recorded as the site's)."""
    privacy = upload.meta.get("privacy")
    return {
        "kind": upload.kind,
        "round": upload.round,
        "items": upload.items,
        "item_shape": list(upload.latents.shape[1:]),
        "bytes": int(wire_bytes if wire_bytes is not None else upload.nbytes()),
        "protected": bool(upload.meta.get("protected") is True and isinstance(privacy, dict)),
        "privacy": privacy if isinstance(privacy, dict) else None,
    }


def screen_uploads(
    uploads: Sequence[LatentUpload], asked: Sequence[str], rnd: int
) -> tuple[list[LatentUpload], dict[str, str]]:
    """``(accepted, {site: why rejected})``: each asked site's one upload of round ``rnd``, with at least one item,
    at most :data:`MAX_UPLOAD_ITEMS`, floating-point latents, and item and label shapes equal to the first acceptable
    upload's. What the server's model can take is the keeper's own check, made first (:meth:`ServerTraining.screen`),
    so no upload the model cannot take becomes the others' reference."""
    accepted: list[LatentUpload] = []
    rejected: dict[str, str] = {}
    seen: set[str] = set()
    for upload in uploads:
        site = upload.site
        problem = None
        if site not in asked:
            problem = "it was not asked for an upload this round"
        elif site in seen:
            problem = "it sent more than one upload"
        elif upload.round != rnd:
            problem = f"its upload is of round {upload.round}, not {rnd}"
        elif not 1 <= upload.items <= MAX_UPLOAD_ITEMS:
            problem = f"its upload holds {upload.items} items (1 to {MAX_UPLOAD_ITEMS} expected)"
        elif not upload.latents.is_floating_point():
            problem = f"its latents are {upload.latents.dtype}, not floating point"
        else:
            ref = accepted[0] if accepted else None
            if ref is not None and (upload.latents.shape[1:] != ref.latents.shape[1:]
                                    or upload.labels.shape[1:] != ref.labels.shape[1:]):  # fmt: skip
                mine = f"{list(upload.latents.shape[1:])} with labels {list(upload.labels.shape[1:])}"
                theirs = f"{list(ref.latents.shape[1:])} with {list(ref.labels.shape[1:])}"
                problem = f"its items are {mine}, other sites' {theirs}"
        seen.add(site)
        if problem is None:
            accepted.append(upload)
        else:
            rejected[site] = f"upload from {site!r} (round {rnd}) rejected: {problem}"
    return accepted, rejected
