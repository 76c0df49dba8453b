"""The server's side of a U-shaped split: its part of the network (a copy of the global model's level-1 skip
submodule), its own optimiser (the bundle's, built from its config over these parameters), and the per-batch
exchange: decode a site's features (shape checked: the asked site, the round, the cut layer's channels), run the
part, answer; decode the gradient (exactly the shape of the answer it gave), back-propagate, step, answer the
gradient w.r.t. the features. A message that does not decode is an :class:`~monai_fedpriv.errors.UpdateError` that
fails that site's round, never the server."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.codec import decode, encode
from monai_fedpriv.fl.messages import Activations, Gradients
from monai_fedpriv.fl.split.link import SERVER_NAME
from monai_fedpriv.fl.tensor_codec import TENSOR_MAGIC, ShapeExpect
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.fl.wire import PREFIX
from monai_fedpriv.networks.unet_cut import part_keys, server_part

__all__ = ["SplitServer"]

MAX_BATCH_BYTES = 2**30
MAX_ITEM_ELEMENTS = 2**26  # features of one item (64 channels of 1024 x 1024)


class SplitServer:
    """The server part of SplitNN and its optimiser.

    Args:
        network: a plain copy of the global network (the server part is taken from it).
        make_optimizer: ``server part -> optimiser`` (the bundle's optimiser over its parameters).
    """

    def __init__(self, network: torch.nn.Module, make_optimizer: Any) -> None:
        self.network = network
        self.part = server_part(network)
        self.keys = part_keys(network, self.part)  # part key -> global key
        self.optimizer = make_optimizer(self.part)
        self.in_channels, self.spatial_dims = _first_conv(self.part)
        self.site: str | None = None
        self.round = 0
        self._io: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin(self, site: str, rnd: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Serve ``site`` for round ``rnd`` from the global model's server part (its optimiser state is kept to go
        back to if the site's round fails)."""
        state = {k: weights[g].clone() for k, g in self.keys.items()}
        self.part.load_state_dict(state)
        self.site, self.round, self._io = site, int(rnd), None
        self._saved = copy.deepcopy(self.optimizer.state_dict())

    def end(self, failed: bool) -> None:
        """The site's round is over: a failed one leaves no trace in the optimiser (its weights are discarded)."""
        if failed and getattr(self, "_saved", None) is not None:
            self.optimizer.load_state_dict(self._saved)
        self.site, self._io, self._saved = None, None, None

    def site_model(self, model: GlobalModel, drop: bool = False) -> GlobalModel:
        """``model`` as a SplitNN site receives it: the server part zeroed (the site's network keeps it as an unused
        placeholder), or left out (``drop``: what a remote site would need, for counting bytes)."""
        server = set(self.keys.values())
        if drop:
            weights = {k: v for k, v in model.weights.items() if k not in server}
        else:
            weights = {k: torch.zeros_like(v) if k in server else v for k, v in model.weights.items()}
        return GlobalModel(model.round, weights, model.optimizer_state, model.stop, dict(model.instructions))

    def weights(self) -> dict[str, torch.Tensor]:
        """The server part's weights under the global model's keys."""
        own = self.part.state_dict()
        return {g: own[k].detach().clone() for k, g in self.keys.items()}

    def handle(self, data: bytes) -> bytes:
        """Answer one message of the site being served (``UpdateError`` on anything unexpected)."""
        if self.site is None:
            raise UpdateError("the split server is serving no site.")
        if len(data) > MAX_BATCH_BYTES or len(data) < PREFIX.size or bytes(data[:4]) != TENSOR_MAGIC:
            raise UpdateError(f"split message from {self.site!r}: not a tensor message within {MAX_BATCH_BYTES} bytes.")
        try:
            return self._forward(data) if self._io is None else self._backward(data)
        except UpdateError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a site's tensors do to the server part is that site's
            self._io = None
            raise UpdateError(f"split message from {self.site!r}: the server part refused it: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _forward(self, data: bytes) -> bytes:
        msg = decode(data, ShapeExpect(Activations.kind, self.site, self.round,
                                       {"tensors.x": (None, self.in_channels, *(None,) * self.spatial_dims)},
                                       MAX_BATCH_BYTES))  # fmt: skip
        x = msg.tensors["x"]
        if x.dtype != torch.float32 or x[0].numel() > MAX_ITEM_ELEMENTS:
            raise UpdateError(f"split message from {self.site!r}: features {list(x.shape)} {x.dtype}, expected "
                              f"float32 with at most {MAX_ITEM_ELEMENTS} elements per item.")  # fmt: skip
        train = msg.meta.get("train") is True
        self.part.train(train)
        inp = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = self.part(inp)
        if train:
            self._io = (inp, out)
        return encode(Activations(SERVER_NAME, self.round, msg.step, {"y": out.detach()}))

    def _backward(self, data: bytes) -> bytes:
        assert self._io is not None
        inp, out = self._io
        msg = decode(data, ShapeExpect(Gradients.kind, self.site, self.round, {"tensors.g": tuple(out.shape)},
                                       MAX_BATCH_BYTES))  # fmt: skip
        self._io = None
        out.backward(msg.tensors["g"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if inp.grad is None:
            raise UpdateError("the server part's output does not depend on its input: no gradient to send back.")
        return encode(Gradients(SERVER_NAME, self.round, msg.step, {"g": inp.grad.detach()}))

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])


def _first_conv(module: torch.nn.Module) -> tuple[int, int]:
    """``(input channels, spatial dims)`` of the server part's first convolution."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return int(m.in_channels), len(m.kernel_size)
    raise ValueError("the server part has no convolution to read its input channels from.")
