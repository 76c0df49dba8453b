"""The site side of NVIDIA FLARE's Client API as a :class:`~monai_fedpriv.fl.transport.Transport`.

The payload is the project's codec bytes in both directions (``{"global": bytes}`` from the server,
``{"update": bytes}`` from a site), so unshared coordinates of a sparse update never cross the wire and the bytes
sent are counted exactly; the site's filters have run before :meth:`NVFlareTransport.send` is called. Like the
in-process transport, it hands control back after a send (``yields_control``): the site loop
(:mod:`monai_fedpriv.fl.nvflare.client`) takes the round's task from FLARE, resumes the site's engine until its
update is sent, and answers the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from monai_fedpriv.fl.codec import Expected, decode_global, encode_update
from monai_fedpriv.fl.transport.base import Transport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate

__all__ = ["NUM_STEPS", "NVFlareTransport", "Task", "require_nvflare"]

NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"  # nvflare.apis.fl_constant.FLMetaKey.NUM_STEPS_CURRENT_ROUND


def require_nvflare() -> Any:
    """``nvflare.client``, or an error that says what to install."""
    try:
        import nvflare.client as flare
    except ImportError as exc:  # an optional dependency: the in-process simulator does not need it
        raise ImportError(
            "NVIDIA FLARE is not installed: pip install 'monai-fedpriv[deploy]' (nvflare 2.9)."
        ) from exc
    return flare


@dataclass
class Task:
    """One task from the server: ``"train"`` (train a round from ``model``) or ``"validate"`` (score ``model``)."""

    name: str
    model: GlobalModel
    meta: dict[str, Any] = field(default_factory=dict)
    #: other encoded messages the task carries (CWT+Replay's generator: ``"generator"``), still undecoded
    extras: dict[str, bytes] = field(default_factory=dict)


class NVFlareTransport(Transport):
    """Client API transport of one site (import it only inside an NVFlare client process).

    The server's global models are decoded as untrusted bytes against :attr:`expected` (the structure of the site's
    own model, set by :meth:`expect`, else pinned from the first global model received), so a later answer never
    allocates more than that model.

    Args:
        tamper: ``update -> update`` applied after the site's filters (``--inject-fault``, testing only).
        tamper_bytes: ``(update, encoded bytes) -> bytes`` applied to the encoding, after ``tamper`` (the ``bytes``
            fault, testing only): what the answer carries.
    """

    yields_control = True

    def __init__(
        self,
        tamper: Callable[[ModelUpdate], ModelUpdate] | None = None,
        tamper_bytes: Callable[[ModelUpdate, bytes], bytes] | None = None,
    ) -> None:
        self.flare = require_nvflare()
        self.tamper = tamper
        self.tamper_bytes = tamper_bytes
        self.current: GlobalModel | None = None
        self.pending: dict[str, tuple[bytes, ModelUpdate | None]] = {}
        self.expected: Expected | None = None

    def expect(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Decode every later global model against ``weights`` (the site's own model): its keys, shapes, dtypes."""
        self.expected = Expected.of(weights)

    def site_name(self) -> str:
        return str(self.flare.get_site_name())

    def pull(self) -> Task | None:
        """The next task, or ``None`` when the job is over."""
        if not self.flare.is_running():
            return None
        model = self.flare.receive()
        if model is None:
            return None
        blob = (model.params or {}).get("global")
        task = str(self.flare.get_task_name())
        if task.startswith("secagg_") and self.current is not None:  # a stage of secure aggregation: no new model
            stage = {k: bytes(v) for k, v in (model.params or {}).items() if isinstance(v, (bytes, bytearray))}
            return Task(task, self.current, dict(model.meta or {}), stage)
        if not isinstance(blob, (bytes, bytearray)):
            keys = sorted(model.params or {})
            raise ValueError(f"the server's task carries no encoded global model (params {keys}).")
        self.current = decode_global(bytes(blob), self.expected)
        if self.expected is None:
            self.expect(self.current.weights)
        extras = {k: bytes(v) for k, v in (model.params or {}).items()
                  if k != "global" and isinstance(v, (bytes, bytearray))}  # fmt: skip
        return Task(task, self.current, dict(model.meta or {}), extras)

    # -- what FederatedSync calls -------------------------------------------------------------------------------
    def receive(self, site: str) -> GlobalModel:
        if self.current is None:
            raise RuntimeError(f"{site} asked for the global model before the server sent one.")
        glob = self.current
        return GlobalModel(
            glob.round,
            {k: v.clone() for k, v in glob.weights.items()},
            None if glob.optimizer_state is None else {k: v.clone() for k, v in glob.optimizer_state.items()},
            glob.stop,
            dict(glob.instructions),
        )

    def send(self, update: ModelUpdate) -> None:
        if update.site in self.pending:
            raise RuntimeError(f"{update.site} sent two updates in round {update.round}.")
        sender = update.site
        if self.tamper is not None:
            update = self.tamper(update)
        data = encode_update(update)
        if self.tamper_bytes is not None:  # after the filters and the encoding, never a privacy path
            data = self.tamper_bytes(update, data)
        self.pending[sender] = (data, update)

    def send_message(self, site: str, data: bytes) -> None:
        """Answer this round with the encoded bytes of another message kind (a dataset upload, a generator)."""
        if site in self.pending:
            raise RuntimeError(f"{site} sent two answers in one round.")
        self.pending[site] = (data, None)

    def has_update(self, site: str) -> bool:
        return site in self.pending

    # -- answering the task -------------------------------------------------------------------------------------
    def answer(self, site: str, meta: dict[str, Any]) -> tuple[bytes | None, dict[str, Any]]:
        """The encoded update ``site`` sent this round (``None`` if none) and the answer's meta, taken from the
        pending sends; :meth:`reply_bytes` sends them."""
        sent = self.pending.pop(site, None)
        if sent is None:
            return None, dict(meta)
        blob, update = sent
        if update is None:  # another message kind: no steps to claim
            return blob, dict(meta)
        return blob, {**meta, NUM_STEPS: int(update.local_steps), "dense_bytes": update.dense_bytes()}

    def reply_bytes(self, blob: bytes | None, meta: dict[str, Any]) -> int:
        """Answer the current task with encoded update bytes (or none) and ``meta``; returns the bytes sent."""
        from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

        params: dict[str, Any] = {"update": blob} if blob is not None else {}
        meta = {**meta, "bytes_sent": len(blob) if blob is not None else 0}
        self.flare.send(FLModel(params_type=ParamsType.DIFF, params=params, meta=meta))
        return len(blob) if blob is not None else 0
