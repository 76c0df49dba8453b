"""The site's side of a U-shaped split: the level-1 skip connection of the site's U-Net is replaced by
:class:`RemoteSkip`, whose forward sends the cut-layer features to the server and returns its answer, and whose
backward (an autograd node, :class:`~monai_fedpriv.networks.unet_cut.RemoteCall`) sends the gradient and returns the
gradient w.r.t. the features. The bundle's own trainer, loss and optimiser run unchanged on the site's network; the
server part stays in it, frozen and never run, so the site's weights keep the global model's keys (its coordinates
are never sent: :func:`install_split` names the keys the site shares)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from monai_fedpriv.fl.codec import decode, encode
from monai_fedpriv.fl.messages import Activations, Gradients
from monai_fedpriv.fl.tensor_codec import ShapeExpect
from monai_fedpriv.fl.weights import unwrap
from monai_fedpriv.networks.unet_cut import RemoteCall, _merge, site_keys

__all__ = ["SERVER_NAME", "CodecLink", "RemoteSkip", "install_split"]

SERVER_NAME = "server"


class CodecLink:
    """A site's per-batch link to a :class:`~monai_fedpriv.fl.split.server.SplitServer`: every exchange is encoded,
    handed over as bytes and decoded against what the site expects (the server's answer has the shape it asked
    for); counts messages and bytes each way."""

    def __init__(self, site: str, server: Any) -> None:
        self.site, self.server = site, server
        self.round, self.step, self.training = 1, 0, True
        self.messages = self.bytes_sent = self.bytes_received = 0
        self._sent: tuple[int, ...] = ()  # the shape of the last features sent: the gradient back must match it

    def reset(self, rnd: int) -> None:
        self.round, self.step = int(rnd), 0
        self.messages = self.bytes_sent = self.bytes_received = 0

    def _exchange(self, message: Any, answer_kind: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        data = encode(message)
        reply = self.server.handle(data)
        self.messages += 2
        self.bytes_sent += len(data)
        self.bytes_received += len(reply)
        key = "y" if answer_kind == Activations.kind else "g"
        got = decode(reply, ShapeExpect(answer_kind, SERVER_NAME, self.round, {f"tensors.{key}": shape}))
        return got.tensors[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step += 1
        meta = {"train": bool(self.training and torch.is_grad_enabled())}
        msg = Activations(self.site, self.round, self.step, {"x": x.detach().cpu()}, meta)
        free: tuple[int | None, ...] = (None,) * (x.dim() - 1)
        y = self._exchange(msg, Activations.kind, (int(x.shape[0]), *free))
        self._sent = tuple(x.shape)
        return y.to(x.device)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        msg = Gradients(self.site, self.round, self.step, {"g": grad.detach().cpu()})
        return self._exchange(msg, Gradients.kind, self._sent).to(grad.device)


class RemoteSkip(nn.Module):
    """Stands in the site's U-Net for the level-1 skip connection: forward sends the cut-layer features across and
    merges the answer with them as the skip connection would; ``submodule`` (the server part, frozen, never run)
    keeps its keys in the site's weights."""

    def __init__(self, skip: nn.Module, link: CodecLink) -> None:
        super().__init__()
        self.submodule: nn.Module = skip.submodule  # type: ignore[assignment]
        for p in self.submodule.parameters():
            p.requires_grad_(False)
        self.mode, self.dim = getattr(skip, "mode", "cat"), getattr(skip, "dim", 1)
        self.link = link

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        self.link.training = self.training
        y = RemoteCall.apply(x1, self.link, torch.is_grad_enabled())
        return _merge((self.mode, self.dim), x1, y)


def install_split(network: nn.Module, link: CodecLink) -> list[str]:
    """Put ``link`` in place of ``network``'s server part (in place, same weight names); returns the keys the site
    shares (its own part's)."""
    plain = unwrap(network)
    shared = site_keys(plain)
    levels = getattr(plain, "model", None)
    if not isinstance(levels, nn.Sequential) or len(levels) != 3:
        raise ValueError(f"SplitNN needs a MONAI UNet; got {type(plain).__name__}.")
    levels[1] = RemoteSkip(levels[1], link)
    return shared
