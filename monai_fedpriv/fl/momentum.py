"""Client optimiser state across federated rounds (Li et al. 2019, "Privacy-preserving Federated Brain Tumour
Segmentation", sec. 2.1 and Algorithm 1):

* ``"restart"`` ("m. restart"): moments are re-initialised at the start of every round (Algorithm 1, line 3);
* ``"local"`` ("baseline m."): each site keeps its own moments across rounds and never shares them;
* ``"aggregate"`` ("m. aggregation"): moments are sent with the update, averaged by the server like the weights,
  and loaded back at the start of the next round. This releases more information: privacy filters treat it as part
  of the update, and DP-SGD's guarantee covers it only because moments are post-processing of noised gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from monai_fedpriv.fl.weights import strip_prefixes

__all__ = [
    "MOMENTUM_POLICIES", "export_optimizer_state", "import_optimizer_state", "restart_optimizer_state", "sent_fields",
]  # fmt: skip

MOMENTUM_POLICIES = ("restart", "local", "aggregate")


def sent_fields(momentum: str) -> set[str]:
    """The tensor fields (``"kind.field"``) a site's update carries under the ``momentum`` policy: the delta, and the
    optimiser moments when they are aggregated."""
    return {"update.delta", "update.optimizer_state"} if momentum == "aggregate" else {"update.delta"}


def _named_params(network: nn.Module) -> dict[int, str]:
    names = strip_prefixes(dict(network.named_parameters()))
    return {id(p): n for n, p in names.items()}


def restart_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget every per-parameter state (Adam moments and step counts, SGD momentum buffers)."""
    optimizer.state.clear()


def export_optimizer_state(optimizer: torch.optim.Optimizer, network: nn.Module) -> dict[str, torch.Tensor]:
    """Flatten floating per-parameter state tensors to ``{"<param name>/<state key>": tensor}``.

    Scalar step counters are left out: they stay local (they are not model information).
    """
    names = _named_params(network)
    out: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        name = names.get(id(param))
        if name is None:
            raise KeyError("optimizer holds state for a tensor that is not a parameter of the network.")
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and value.shape == param.shape:
                out[f"{name}/{key}"] = value.detach().to("cpu", copy=True)
    return out


def import_optimizer_state(
    optimizer: torch.optim.Optimizer, network: nn.Module, flat: Mapping[str, torch.Tensor]
) -> None:
    """Load aggregated moments produced by :func:`export_optimizer_state` back into ``optimizer``.

    Parameters that had no state yet get the aggregated tensors and, for Adam-like optimisers, a step counter of 1
    so bias correction stays finite.
    """
    by_name = {n: p for p, n in ((p, n) for n, p in strip_prefixes(dict(network.named_parameters())).items())}
    for flat_key, value in flat.items():
        name, _, key = flat_key.rpartition("/")
        if name not in by_name:
            raise KeyError(f"aggregated optimiser state names unknown parameter {name!r}.")
        param = by_name[name]
        state = optimizer.state[param]
        if key in state and torch.is_tensor(state[key]):
            state[key].copy_(value.to(state[key].device, state[key].dtype))
        else:
            state[key] = value.to(param.device, param.dtype).clone()
            if "step" not in state and key.startswith("exp_avg"):
                state["step"] = torch.tensor(1.0)
