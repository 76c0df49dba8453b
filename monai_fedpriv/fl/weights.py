"""State-dict helpers: what a site exchanges is the plain network's state, never a wrapper's.

Opacus' ``GradSampleModule`` prefixes every key with ``_module.``; ``DataParallel``/DDP with ``module.``. Weights are
stripped of those prefixes before they leave a site or are saved, so a checkpoint of a DP-trained site loads into
the plain bundle network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["unwrap", "exchangeable_state", "load_exchangeable_state", "subtract", "strip_prefixes"]

_WRAPPER_ATTRS = ("_module", "module")
_WRAPPER_PREFIXES = ("_module.", "module.")


def unwrap(network: nn.Module) -> nn.Module:
    """Return the innermost plain module under Opacus/DataParallel wrappers."""
    seen = 0
    while seen < 8:
        inner = None
        for attr in _WRAPPER_ATTRS:
            candidate = getattr(network, attr, None)
            if isinstance(candidate, nn.Module) and len(list(network.children())) == 1:
                inner = candidate
                break
        if inner is None:
            return network
        network = inner
        seen += 1
    return network


def strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove wrapper prefixes from every key: leading ``_module.`` / ``module.`` (Opacus, DataParallel/DDP) and an
    inner ``._module.`` (Opacus wrapping a submodule), so the keys are the plain network's.

    Raises:
        KeyError: when two keys become the same after stripping (the state mixes wrapped and plain entries).

    Example:
        >>> list(strip_prefixes({"module._module.conv.weight": 1, "head._module.bias": 2}))
        ['conv.weight', 'head.bias']
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = key
        while new.startswith(_WRAPPER_PREFIXES):
            new = new.split(".", 1)[1]
        new = new.replace("._module.", ".")
        if new in out:
            raise KeyError(f"stripping wrapper prefixes makes key {key!r} collide with {new!r}.")
        out[new] = value
    return out


def exchangeable_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copy of the plain network's state dict (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(network).state_dict().items()}


def load_exchangeable_state(network: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load prefix-free ``weights`` into ``network`` (wrapped or not), in place, keeping device and dtype."""
    target = unwrap(network)
    own = target.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise KeyError(f"weights do not match the network: missing {missing[:5]}, unexpected {extra[:5]}.")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(weights[key].to(device=tensor.device, dtype=tensor.dtype))


def subtract(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``a - b`` key by key (integer buffers subtract as integers)."""
    return {k: a[k] - b[k] for k in a}
