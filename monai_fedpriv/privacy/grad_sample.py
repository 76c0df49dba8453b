"""Per-sample gradient strategies for DP-SGD (the ``grad_sample_mode`` of :func:`~.dp_sgd.make_site_private`).

* ``"hooks"`` (default), :class:`TensorHookGradSampleModule`: Opacus' per-layer grad-sampler design, made cheaper:

  - the forward runs with the weights frozen, so backward computes activation gradients only and never forms the
    batch weight gradient (which DP-SGD discards anyway);
  - each layer's output gradient is captured with a *tensor* hook (MONAI's in-place residual adds and DynUNet's
    shared ``skip_layers`` work; shared modules are hooked once);
  - convolutions pick, per layer and shape, im2col + ``bmm`` or one grouped weight-gradient convolution over the
    whole batch (:func:`_conv_grad_sample`); PReLU and ConvTranspose have closed-form samplers;
  - no copies of output gradients or per-sample gradients beyond what the samplers write.

* ``"microbatch"``: each sample runs its own forward/backward (exact for any network, slow).
* ``"opacus_hooks"``: Opacus' ``GradSampleModule`` unchanged; ``"functorch"``: every layer through ``torch.func``.

(PyTorch's expanded weights are not offered: they reject PReLU, the activation of MONAI's UNet.)

``benchmarks/dp_step.py`` measures them against the non-private step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample as _OPACUS_CONV
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.grad_sample_module import (
    _get_batch_size,
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from opacus.utils.module_utils import has_trainable_params
from torch import nn

from monai_fedpriv.errors import PrivacyConfigError

__all__ = [
    "GRAD_SAMPLE_MODES",
    "MicroBatchGradSampleModule",
    "TensorHookGradSampleModule",
    "empty_like_batch",
    "plain_copy",
    "wrap_for_grad_sample",
]

GRAD_SAMPLE_MODES = ("hooks", "microbatch", "opacus_hooks", "functorch")


def _prelu_grad_sample(
    layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of PReLU's slope: ``d/da prelu(x) = min(x, 0)`` (Opacus would use functorch)."""
    x = activations[0].to(backprops.dtype)
    prod = backprops * x.clamp(max=0)
    if layer.weight.numel() == 1:
        return {layer.weight: prod.reshape(prod.shape[0], -1).sum(1, keepdim=True)}
    return {layer.weight: prod.reshape(prod.shape[0], prod.shape[1], -1).sum(2)}


def _conv_transpose_grad_sample(
    layer: nn.ConvTranspose2d | nn.ConvTranspose3d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a transposed convolution (groups=1) by unfolding the output gradient.

    ``y = conv_transpose(x, W)`` is the adjoint of ``conv(., W)``, so ``dW[i, o, k] = sum_l x[i, l] * U[o, k, l]``
    with ``U`` the unfolded ``dL/dy`` under the layer's kernel, stride, padding and dilation (one column per input
    position ``l``). Replaces Opacus' per-layer functorch fallback.
    """
    from opacus.utils.tensor_utils import unfold2d, unfold3d

    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    kw = {
        "kernel_size": layer.kernel_size,
        "padding": layer.padding,
        "stride": layer.stride,
        "dilation": layer.dilation,
    }
    unfolded = unfold2d(backprops, **kw) if isinstance(layer, nn.ConvTranspose2d) else unfold3d(backprops, **kw)
    if unfolded.shape[-1] != x[0, 0].numel():  # cannot happen for output_padding < stride (PyTorch's own rule)
        raise PrivacyConfigError(f"unexpected ConvTranspose geometry in {layer}: {unfolded.shape} vs {x.shape}.")
    grads = torch.einsum("nil,nkl->nik", x.reshape(n, x.shape[1], -1), unfolded)
    out: dict[torch.Tensor, torch.Tensor] = {layer.weight: grads.reshape(n, *layer.weight.shape)}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(n, backprops.shape[1], -1).sum(2)
    return out


def _grouped_conv_grad_sample(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
    padding: list[int] | None = None,
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample weight gradients as one grouped weight-gradient convolution (Rochette et al. 2019,
    "Efficient per-example gradient computations in convolutional neural networks").

    Folding the batch into the channel axis (``(n, C, ...) -> (1, n*C, ...)``) and multiplying the groups by ``n``
    makes sample ``i``'s input meet only sample ``i``'s output gradient, so the backend's own weight-gradient kernel
    (oneDNN / cuDNN) returns all ``n`` per-sample gradients at once without Opacus' im2col copy, which grows with
    ``in_channels * kernel_size * positions`` per sample (measured 2-8x slower than this on 32x32-64x64 2D feature
    maps and up to 18x in 3D, on CPU). Handles transposed convolutions too; ``padding`` overrides the layer's (for
    inputs the caller has already padded).
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    w = layer.weight
    out: dict[torch.Tensor, torch.Tensor] = {}
    transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    if w.requires_grad:
        _, gw, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, -1, *backprops.shape[2:]),
            x.reshape(1, -1, *x.shape[2:]),
            w.new_empty((n * w.shape[0], *w.shape[1:]), dtype=backprops.dtype),  # only its shape is read
            None,
            list(layer.stride),
            list(layer.padding) if padding is None else padding,
            list(layer.dilation),
            transposed,
            list(layer.output_padding) if transposed else [0] * (w.dim() - 2),
            layer.groups * n,
            [False, True, False],
        )
        out[w] = gw.view(n, *w.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(n, backprops.shape[1], -1).sum(2)
    return out


def _conv_grad_sample(layer: Any, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Per layer and shape, the faster of two exact samplers (the rule reads shapes only, so a run and its resume
    always take the same path):

    * im2col + ``bmm`` (Opacus' sampler; :func:`_conv_transpose_grad_sample` for transposed layers) when the
      contraction runs over at most 64 positions, or when a side has fewer than 8 channels per group and the
      unfolded tensor stays under 4M elements;
    * :func:`_grouped_conv_grad_sample` otherwise.

    Measured per layer of the default UNet on 2 CPU threads: im2col wins on the 8x8 bottleneck and the 1- or
    3-channel ends of 2D networks, the grouped kernel wins by 1.3-3x on 2D feature maps of 16x16 and more and by
    up to 18x in 3D (64^3).
    """
    x = activations[0]
    transposed = isinstance(layer, (nn.ConvTranspose2d, nn.ConvTranspose3d))
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        # reflect/replicate/circular: pad as the layer's forward does, then a zero-padding-free weight gradient.
        # (Opacus' im2col sampler zero-pads instead and returns wrong per-sample gradients for these layers.)
        padded = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return _grouped_conv_grad_sample(layer, [padded], backprops, padding=[0] * (x.dim() - 2))
    if x.shape[0] == 0 or isinstance(layer.padding, str):
        use_im2col = True
    elif transposed and layer.groups != 1:
        use_im2col = False  # the im2col sampler for transposed convolutions handles groups=1 only
    else:
        positions = (x if transposed else backprops)[0, 0].numel()
        unfolded_rows = (layer.out_channels if transposed else layer.in_channels // layer.groups) * math.prod(
            layer.kernel_size
        )
        few_channels = min(layer.in_channels, layer.out_channels) // layer.groups < 8
        use_im2col = positions <= 64 or (few_channels and x.shape[0] * unfolded_rows * positions <= 2**22)
    if not use_im2col:
        return _grouped_conv_grad_sample(layer, activations, backprops)
    if transposed:
        return _conv_transpose_grad_sample(layer, activations, backprops)
    return _OPACUS_CONV(layer, activations, backprops)


class TensorHookGradSampleModule(GradSampleModule):
    """Opacus ``GradSampleModule`` with a cheaper backward: frozen-weight forward, tensor hooks, per-shape samplers.

    Per-sample gradients equal Opacus' (tested against a per-sample loop). Differences from Opacus:

    * While the graph is recorded (training, grad enabled) the trainable parameters have ``requires_grad=False``;
      each hooked layer's output re-enters the graph (a leaf clone where nothing upstream requires grad), so
      backward computes activation gradients and the hooks compute per-sample weight gradients, and ``p.grad``
      stays ``None`` until the DP optimizer writes the noised sum. ``skip_batch_grad = False`` restores the plain
      graph.
    * A tensor hook on a layer's output receives the gradient of that value even if the forward code later
      modifies it in place, which a module full-backward hook forbids.
    * PReLU and ConvTranspose get closed-form samplers, and convolutions choose per shape between im2col and a
      grouped weight-gradient convolution (:func:`_conv_grad_sample`).
    """

    skip_batch_grad: bool = True

    GRAD_SAMPLERS = {
        **GradSampleModule.GRAD_SAMPLERS,
        nn.PReLU: _prelu_grad_sample,
        nn.Conv2d: _conv_grad_sample,
        nn.Conv3d: _conv_grad_sample,
        nn.ConvTranspose2d: _conv_grad_sample,
        nn.ConvTranspose3d: _conv_grad_sample,
    }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else None
        if not (torch.is_tensor(x) and x.shape[0] == 0):
            hooks_on = bool(getattr(self, "hooks_enabled", True))
            if not (self.skip_batch_grad and hooks_on and self.training and torch.is_grad_enabled()):
                return self._module(*args, **kwargs)
            # Parameters are frozen while the graph is recorded, so backward computes only activation gradients:
            # the batch weight gradient (which the DP optimizer would overwrite with the clipped, noised sum) is
            # never formed. Hooked layers re-enter the graph through their outputs (see _forward_hook).
            frozen = [p for p in self._trainable if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                return self._module(*args, **kwargs)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
        # Empty Poisson batch: many layers (InstanceNorm...) reject a zero batch. Run one all-zero dummy sample with
        # the hooks off and return an empty slice of its output: the graph exists, no per-sample gradient is
        # recorded, and the optimizer step adds pure noise (see _LedgerDPOptimizer).
        enabled: bool = bool(getattr(self, "hooks_enabled", True))
        self.disable_hooks()
        try:
            out = self._module(torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device), *args[1:], **kwargs)
        finally:
            self.hooks_enabled = enabled
        return empty_like_batch(out)

    def iterate_submodules(self, module: nn.Module, _seen: set[int] | None = None) -> Iterable[nn.Module]:
        seen = set() if _seen is None else _seen
        if id(module) in seen:
            return
        seen.add(id(module))
        if has_trainable_params(module):
            yield module
            if type(module) not in self.GRAD_SAMPLERS:
                return  # handled as a whole by functorch
        for child in module.children():
            yield from self.iterate_submodules(child, seen)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False):
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        self._trainable = [p for p in self._module.parameters() if p.requires_grad]
        for module in self.iterate_submodules(self._module):
            trainable = [p for p in module.parameters() if p.requires_grad]
            module._dp_trainable = trainable  # type: ignore[assignment]
            module._dp_numel = sum(p.numel() for p in trainable)  # type: ignore[assignment]
            if force_functorch or type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=batch_first)
            hook = partial(self._forward_hook, loss_reduction=loss_reduction, batch_first=batch_first)
            self.autograd_grad_sample_hooks.append(module.register_forward_hook(hook))
        self.enable_hooks()

    def _forward_hook(self, module: Any, inputs: Any, output: Any, *, loss_reduction: str, batch_first: bool):
        if not self.hooks_enabled or not module.training or not torch.is_grad_enabled():
            return
        if not torch.is_tensor(output):
            return
        if not output.requires_grad:
            if not self.skip_batch_grad:
                return
            # frozen forward: the first hooked layer (or one fed only by non-trainable inputs) starts the graph
            output = output.detach().requires_grad_(True).clone()
        elif output._is_view():
            # An in-place op on a view (InstanceNorm returns one) re-bases it and drops hooks registered on it.
            output = output.clone()
        if not hasattr(module, "activations"):
            module.activations = []
        module.activations.append([t.detach() if torch.is_tensor(t) else t for t in inputs])
        for p in module._dp_trainable:
            p._forward_counter += 1

        def on_grad(grad: torch.Tensor) -> None:
            self.capture_backprops_hook(module, None, (grad,), loss_reduction=loss_reduction, batch_first=batch_first)

        output.register_hook(on_grad)
        return output

    def capture_backprops_hook(
        self,
        module: Any,
        _forward_input: Any,
        forward_output: Any,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        """Opacus' hook with two copies removed: the ``mean`` reduction's factor ``n`` multiplies whichever of the
        output gradient or the per-sample gradients is smaller (per-sample gradients are linear in the output
        gradient), and a layer's first per-sample gradient is stored as computed instead of being copied into a
        freshly zeroed buffer."""
        if not self.hooks_enabled:
            return
        if not batch_first:
            return super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction, batch_first)
        backprops = forward_output[0].detach()
        if not hasattr(module, "max_batch_len"):
            module.max_batch_len = _get_batch_size(module=module, batch_dim=0)
        n = module.max_batch_len
        activations = module.activations.pop()
        if loss_reduction not in ("mean", "sum"):
            raise PrivacyConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        scale = n if loss_reduction == "mean" else 1
        if scale != 1 and backprops.numel() <= n * module._dp_numel:
            backprops, scale = backprops * scale, 1
        module_type = self._get_module_type(module)
        if not self.force_functorch and module_type in self.GRAD_SAMPLERS:
            sampler = self.GRAD_SAMPLERS[module_type]
        else:
            sampler = ft_compute_per_sample_gradient
        for param, gs in sampler(module, activations, backprops).items():
            if not param.requires_grad:
                continue
            if scale != 1:
                gs = gs * scale
            elif gs.untyped_storage().data_ptr() == backprops.untyped_storage().data_ptr():
                gs = gs.clone()  # never alias autograd's gradient buffer
            if hasattr(param, "_current_grad_sample") or gs.shape[0] != n:
                create_or_accumulate_grad_sample(param=param, grad_sample=gs, max_batch_len=n)
            else:
                param._current_grad_sample = gs
        for p in module._dp_trainable:
            p._forward_counter -= 1
            if p._forward_counter == 0:
                promote_current_grad_sample(p)
            if not self.grad_accumulation_allowed and isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
                raise PrivacyConfigError(
                    "Poisson sampling is not compatible with gradient accumulation: call optimizer.step() after "
                    "every backward pass, or use max_physical_batch_size."
                )
        if not module.activations and hasattr(module, "max_batch_len"):
            del module.max_batch_len


class MicroBatchGradSampleModule(nn.Module):
    """Per-sample gradients from per-sample micro-batches: sample ``i`` runs its own forward graph.

    ``forward(x)`` (training, grad enabled) runs the network on each sample separately and returns the
    concatenated output as a new leaf tensor. When the loss's backward reaches that leaf, a tensor hook backpropagates
    each sample's output gradient through that sample's own graph, giving ``p.grad_sample`` exactly (the batch
    gradient itself is never formed). The work is that of a non-private step done one sample at a time; batches of
    one use the hardware poorly, so this is a fallback for layers no grad sampler handles, not the fast path.
    No module hooks are used, so in-place ops, shared modules and any layer type work.
    Random layers (dropout) stay consistent: the output the loss sees is the one differentiated.
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean") -> None:
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise PrivacyConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        self._module = module
        self.loss_reduction = loss_reduction

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(x, *args, **kwargs)
        params = [p for p in self._module.parameters() if p.requires_grad]
        if x.shape[0] == 0:
            with torch.no_grad():
                out = self._module(torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device), *args, **kwargs)
            return out[:0].detach().requires_grad_(True)
        outs = [self._module(x[i : i + 1], *args, **kwargs) for i in range(x.shape[0])]
        if not all(torch.is_tensor(o) for o in outs):
            raise PrivacyConfigError("grad_sample_mode='microbatch' needs a network returning one tensor.")
        leaf = torch.cat([o.detach() for o in outs]).requires_grad_(True)
        scale = float(x.shape[0]) if self.loss_reduction == "mean" else 1.0

        def per_sample(grad: torch.Tensor) -> None:
            per_param: list[list[torch.Tensor]] = [[] for _ in params]
            for i, out in enumerate(outs):
                grads = torch.autograd.grad(out, params, grad[i : i + 1] * scale, allow_unused=True)
                for j, (p, g) in enumerate(zip(params, grads, strict=True)):
                    per_param[j].append(torch.zeros_like(p) if g is None else g)
            for p, gs in zip(params, per_param, strict=True):
                stacked = torch.stack(gs)
                prev = getattr(p, "grad_sample", None)
                setattr(p, "grad_sample", stacked if prev is None else torch.cat([prev, stacked]))  # noqa: B010
            outs.clear()

        leaf.register_hook(per_sample)
        return leaf


def _is_grad_sample_hook(hook: Any) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial or a bound method
    return isinstance(getattr(fn, "__self__", None), GradSampleModule)


_M = TypeVar("_M", bound=nn.Module)
_PER_SAMPLE_ATTRS = ("activations", "max_batch_len", "autograd_grad_sample_hooks", "_dp_trainable", "_dp_numel")
_PER_SAMPLE_PARAM_ATTRS = ("grad_sample", "_current_grad_sample", "_forward_counter", "summed_grad")


def plain_copy(module: _M) -> _M:
    """Deep copy of a network without the per-sample-gradient machinery a DP wrapper installed on it.

    A ``GradSampleModule`` (ours or Opacus') registers hooks on the submodules of the network it wraps, and a
    bundle's ``@network`` is that inner network; ``copy.deepcopy`` would carry the hooks (and a copy of the wrapper)
    into the copy, where they fire on every forward (e.g. an attack replaying the server's view of training). The
    hooks are taken off the original during the copy and put back in their order afterwards; per-sample state
    (captured activations, ``grad_sample``) is left out of the copy.
    """
    saved: list[tuple[dict[int, Any], dict[int, Any]]] = []
    for m in module.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
            if any(_is_grad_sample_hook(h) for h in hooks.values()):
                saved.append((hooks, dict(hooks)))
                for key in [k for k, h in hooks.items() if _is_grad_sample_hook(h)]:
                    del hooks[key]
    attrs = {m: {a: m.__dict__.pop(a) for a in _PER_SAMPLE_ATTRS if a in m.__dict__} for m in module.modules()}
    params = {
        p: {a: p.__dict__.pop(a) for a in _PER_SAMPLE_PARAM_ATTRS if a in p.__dict__} for p in module.parameters()
    }
    try:
        return copy.deepcopy(module)
    finally:
        for hooks, original in saved:
            hooks.clear()
            hooks.update(original)
        for m, values in attrs.items():
            m.__dict__.update(values)
        for p, values in params.items():
            p.__dict__.update(values)


def empty_like_batch(batch: Any) -> Any:
    if torch.is_tensor(batch):
        return batch[:0]
    if isinstance(batch, Mapping):
        return {k: empty_like_batch(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and all(torch.is_tensor(v) for v in batch):
        return type(batch)(empty_like_batch(v) for v in batch)
    return []  # collated non-tensor entries (file names, ids): an empty list


def wrap_for_grad_sample(network: nn.Module, mode: str) -> nn.Module:
    if mode == "microbatch":
        return MicroBatchGradSampleModule(network, loss_reduction="mean")
    if mode == "hooks":
        return TensorHookGradSampleModule(network, batch_first=True, loss_reduction="mean")
    if mode == "functorch":
        return TensorHookGradSampleModule(network, batch_first=True, loss_reduction="mean", force_functorch=True)
    if mode == "opacus_hooks":
        return GradSampleModule(network, batch_first=True, loss_reduction="mean")
    raise PrivacyConfigError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {mode!r}.")
