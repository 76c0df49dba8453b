"""Make a segmentation network trainable with per-sample gradients (DP-SGD), and say what was changed.

What breaks per-sample gradients, and what :func:`prepare_for_dp` does about it:

* BatchNorm mixes the samples of a batch and keeps non-private running statistics. It is replaced by
  InstanceNorm without running statistics (as Ziller et al., seed 000 section 3.2, do: "Instance/Channel
  Normalisation", Dai & Heckel 2019) or by GroupNorm (Opacus' default), keeping the affine weights.
* In-place activations (``LeakyReLU(inplace=True)``...) modify a tensor Opacus' backward hooks still need and crash
  the backward pass; they are switched to out-of-place.
* Trainable parameters that receive no gradient in a dry run (unused heads) would have no per-sample gradient and
  stop the DP optimizer; they are frozen.
* Trainable modules called more than once per forward pass are reported: their per-sample gradients are summed
  over the calls, which is correct but counts toward the same clipping norm.

Anything still failing (an unsupported layer, a layer whose per-sample gradient cannot be formed) is found by a dry
run through the per-sample path of :mod:`monai_fedpriv.privacy.dp_sgd` and raised as
:class:`~monai_fedpriv.errors.PrivacyConfigError`.

Example:
    >>> from monai.networks.nets import UNet
    >>> net = UNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2), norm="batch")
    >>> net, changes = prepare_for_dp(net, torch.zeros(1, 1, 32, 32))
    >>> changes[0][:29]
    'model.0.adn.N: BatchNorm2d ->'
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.grad_sample import plain_copy

__all__ = ["load_trained_weights", "prepare_for_dp", "convert_batchnorm", "find_dp_problems"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
NORMS = ("instance", "group")


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _spatial_dims(bn: nn.Module, example_dims: int | None) -> int:
    for cls, dims in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
        if isinstance(bn, cls):
            return dims
    if example_dims is None:
        raise PrivacyConfigError(f"cannot tell the spatial dims of {type(bn).__name__}; use norm='group'.")
    return example_dims


def convert_batchnorm(
    model: nn.Module, norm: str = "instance", spatial_dims: int | None = None
) -> tuple[nn.Module, list[str]]:
    """Replace every BatchNorm of ``model`` (in place) by InstanceNorm or GroupNorm, copying affine weights.

    Args:
        model: the network; modified in place and returned.
        norm: ``"instance"`` (no running statistics) or ``"group"`` (``gcd(32, C)`` groups, Opacus' choice).
        spatial_dims: only needed for ``SyncBatchNorm`` with ``norm="instance"``.

    Returns:
        The model and one line per replaced module.
    """
    if norm not in NORMS:
        raise PrivacyConfigError(f"norm must be one of {NORMS}, got {norm!r}.")
    if isinstance(model, _BATCHNORMS):
        raise PrivacyConfigError("the root module itself is a BatchNorm; wrap it in a container first.")
    changes = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, _BATCHNORMS):
            continue
        c = module.num_features
        new: nn.Module
        if norm == "instance":
            new = _INSTANCE[_spatial_dims(module, spatial_dims)](c, eps=module.eps, affine=module.affine)
        else:
            new = nn.GroupNorm(math.gcd(32, c), c, eps=module.eps, affine=module.affine)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        tensors = list(module.parameters()) + list(module.buffers())
        floats = [t for t in tensors if t.is_floating_point()]
        if floats:  # the norm it replaces decides device and dtype (a float64 model stays float64)
            new = new.to(device=floats[0].device, dtype=floats[0].dtype)
        _set_child(model, name, new)
        changes.append(f"{name}: {type(module).__name__} -> {new!r} (running statistics are not private)")
    return model, changes


def _dry_run_loss(out: object) -> torch.Tensor:
    if torch.is_tensor(out):
        return out.float().pow(2).mean()
    if isinstance(out, (list, tuple)):
        return sum((_dry_run_loss(o) for o in out), torch.zeros(()))
    if isinstance(out, dict):
        return sum((_dry_run_loss(o) for o in out.values()), torch.zeros(()))
    return torch.zeros(())


def _dry_run(probe: nn.Module, batch: torch.Tensor, failure: str) -> None:
    """One forward/backward of ``probe``; any error becomes a ``PrivacyConfigError`` starting with ``failure``."""
    try:
        _dry_run_loss(probe(batch)).backward()
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise PrivacyConfigError(f"{failure}: {err}") from err


def find_dp_problems(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[str]]:
    """Diagnose without changing ``model``: Opacus validator errors, in-place modules, unused and reused modules.

    Returns:
        ``{"validator": [...], "inplace": [...], "unused": [...], "reused": [...], "frozen": [...]}``: names.
    """
    problems: dict[str, list[str]] = {
        "validator": [f"{type(e).__name__}: {str(e)[:120]}" for e in ModuleValidator.validate(model)],
        "inplace": [n for n, m in model.named_modules() if getattr(m, "inplace", False) is True],
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
    }
    probe = plain_copy(model).train()
    calls: Counter[str] = Counter()
    hooks = []
    for name, module in probe.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            hooks.append(module.register_forward_hook(lambda *_, _n=name: calls.update([_n])))
    for p in probe.parameters():
        p.grad = None
    try:
        shape = tuple(example_input.shape)
        _dry_run(probe, example_input, f"dry run of {type(model).__name__} failed on input {shape}")
    finally:
        for h in hooks:
            h.remove()
    problems["unused"] = [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]
    problems["reused"] = [f"{n} (called {k} times)" for n, k in calls.items() if k > 1]
    return problems


def prepare_for_dp(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    norm: str = "instance",
    inplace: bool = True,
    grad_sample_mode: str = "hooks",
) -> tuple[nn.Module, list[str]]:
    """Fix what breaks per-sample gradients and check the result with a dry run through ``GradSampleModule``.

    The model is changed in place by default so that other references to it (a bundle's evaluator, the
    federated sync handler) see the trained weights; pass ``inplace=False`` to work on a deep copy. Rebuild the
    optimizer afterwards: converted norms own new parameters (``make_site_private`` does this).

    Args:
        model: network to prepare.
        example_input: one small input batch (e.g. ``torch.zeros(2, 1, 64, 64)``) on the model's device.
        norm: replacement for BatchNorm, ``"instance"`` (default, as the seed paper) or ``"group"``.
        inplace: modify ``model`` itself (default) or a copy.
        grad_sample_mode: the per-sample gradient mode the dry run checks (the one training will use).

    Returns:
        ``(model, changes)``: the prepared network and human-readable lines describing every change (empty when
        nothing had to change).

    Raises:
        PrivacyConfigError: when the network still cannot produce per-sample gradients after the fixes.
    """
    if not isinstance(model, nn.Module):
        raise PrivacyConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not torch.is_tensor(example_input) or example_input.ndim < 2:
        raise PrivacyConfigError(f"example_input must be a batched tensor, got {type(example_input).__name__}.")
    if isinstance(model, GradSampleModule):
        raise PrivacyConfigError("model is already wrapped in a GradSampleModule; prepare the plain network.")
    if not inplace:
        model = plain_copy(model)
    was_training = model.training
    model.train()
    changes: list[str] = []
    model, bn_changes = convert_batchnorm(model, norm=norm, spatial_dims=example_input.ndim - 2)
    changes += bn_changes
    for name, module in model.named_modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changes.append(f"{name}: {type(module).__name__}(inplace=True) -> inplace=False")
    problems = find_dp_problems(model, example_input)
    if problems["validator"]:
        raise PrivacyConfigError(f"{type(model).__name__} still fails Opacus' validator: {problems['validator']}")
    for name in problems["unused"]:
        model.get_parameter(name).requires_grad_(False)
        changes.append(f"{name}: trainable but gets no gradient -> frozen (requires_grad=False)")
    for line in problems["reused"]:
        changes.append(f"{line}: note, per-sample gradients are summed over the calls before clipping")
    _check_grad_samples(model, example_input, grad_sample_mode)
    model.train(was_training)
    return model, changes


def _check_grad_samples(model: nn.Module, example_input: torch.Tensor, mode: str = "hooks") -> None:
    """Dry run of the per-sample path that training will use (``mode``, see
    :data:`~monai_fedpriv.privacy.grad_sample.GRAD_SAMPLE_MODES`): every trainable parameter must get a per-sample
    gradient of the right size, so an unsupported layer fails here rather than at the first training step."""
    from monai_fedpriv.privacy.grad_sample import wrap_for_grad_sample

    batch = example_input if example_input.shape[0] >= 2 else torch.cat([example_input, example_input])
    probe_net = plain_copy(model).train()
    probe = wrap_for_grad_sample(probe_net, mode)
    _dry_run(probe, batch, f"per-sample gradients ({mode!r}) fail for {type(model).__name__} after preparation")
    samples = {n: getattr(p, "grad_sample", None) for n, p in probe_net.named_parameters() if p.requires_grad}
    bad = [n for n, g in samples.items() if not torch.is_tensor(g) or g.shape[0] != batch.shape[0]]
    if bad:
        raise PrivacyConfigError(f"no per-sample gradient ({mode!r}) for {bad[:5]} in {type(model).__name__}.")


def load_trained_weights(
    network: nn.Module, weights: Mapping[str, torch.Tensor], example_input: torch.Tensor, *, norm: str = "instance"
) -> nn.Module:
    """Load weights that came out of a federation into a freshly built bundle network, preparing the network the
    way the sites' DP-SGD did when the weights say so (e.g. no BatchNorm running statistics: InstanceNorm).

    Returns:
        ``network`` (changed in place when it had to be prepared), holding ``weights``.

    Raises:
        KeyError: when the weights match neither the plain nor the prepared network (names the keys).
    """
    from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state

    if set(exchangeable_state(network)) != set(weights):
        network, _ = prepare_for_dp(network, example_input, norm=norm)
    load_exchangeable_state(network, weights)
    return network
