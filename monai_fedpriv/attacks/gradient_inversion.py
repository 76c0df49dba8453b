"""Gradient inversion of a shared model update (Eq. 1 of seed 004; Geiping et al., 2020; seed 000, sec. 3.3).

An honest-but-curious server holds the global weights, the loss, and the update a site sent. It searches for an
image ``x~`` (and, when the victim's mask is unknown, a soft mask) whose own update points the same way:

    argmin_x~  1 - <dW(x~), dW(x)> / (||dW(x~)|| ||dW(x)||)  +  alpha * TV(x~)        (Eq. 1)

where ``dW`` is the weight difference after the site's ``K`` local SGD steps (``K = 1``: one gradient, up to the
factor ``-lr``), replayed with the known learning rate and clipping norm. The image is optimised with Adam on signed
gradients, a step-decay schedule (x0.1 at 3/8, 5/8 and 7/8 of the run) and a box constraint to the bundle's
intensity range. Several random restarts are run side by side with ``torch.func`` (``vmap`` over restarts of a
``functional_call`` graph) and the winner is the restart with the lowest *matching* loss: the attacker never sees
the victim image, so it cannot pick by PSNR.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from monai_fedpriv.attacks.threat_model import ThreatModel, soft_target_loss
from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.fl.weights import strip_prefixes

__all__ = ["reconstruct", "replay_update", "total_variation", "cosine_matching_loss", "cpu_threads"]


@contextlib.contextmanager
def cpu_threads(num_threads: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(num_threads)`` and restore the previous setting (no-op for None)."""
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels/voxels of ``(B, C, *spatial)`` images (anisotropic TV)."""
    tv = x.new_zeros(())
    for dim in range(2, x.dim()):
        tv = tv + (x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)).abs().mean()
    return tv


def cosine_matching_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` for two flat vectors, the matching term of Eq. 1."""
    return 1 - (a * b).sum() / (a.norm() * b.norm() + 1e-12)


def replay_update(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    soft_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    soft_mask: torch.Tensor,
    threat_model: ThreatModel,
) -> dict[str, torch.Tensor]:
    """The attacker's differentiable replay of a site's round: ``K`` SGD steps from ``params``, as a weight difference.

    Each step clips the batch gradient to ``threat_model.max_grad_norm`` (per-sample clipping for batch size 1);
    noise is not replayed (the attacker cannot know it). Pure ``torch.func`` code, so it runs under ``vmap``.

    Args:
        model: the network (only its structure is used, through ``functional_call``).
        params: the global parameters, by name.
        buffers: the model's buffers, by name.
        soft_loss: loss taking one-hot/probability targets (see :func:`soft_target_loss`).
        image: batch ``(B, C, *spatial)``.
        soft_mask: targets ``(B, num_classes, *spatial)``.
        threat_model: gives ``local_steps``, ``lr`` and ``max_grad_norm``.

    Returns:
        ``{name: replayed_local - global}``.
    """
    tm = threat_model
    p = params
    for _ in range(tm.local_steps):

        def step_loss(q: dict[str, torch.Tensor]) -> torch.Tensor:
            return soft_loss(functional_call(model, (q, buffers), (image,)), soft_mask)

        g = grad(step_loss)(p)
        if tm.max_grad_norm is not None:
            norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
            scale = torch.clamp(tm.max_grad_norm / (norm + 1e-6), max=1.0)
            g = {n: v * scale for n, v in g.items()}
        p = {n: p[n] - tm.lr * g[n] for n in p}
    return {n: p[n] - params[n] for n in params}


def _flatten_update(
    update: ModelUpdate | Mapping[str, torch.Tensor], names: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    delta = update.delta if isinstance(update, ModelUpdate) else update
    masks = update.masks if isinstance(update, ModelUpdate) else None
    delta = strip_prefixes(delta)
    missing = [n for n in names if n not in delta]
    if missing:
        raise UpdateError(f"the update lacks parameters of the attacked model: {missing[:5]}.")
    flat = torch.cat([delta[n].detach().reshape(-1).float() for n in names]).to(device)
    if not bool(torch.isfinite(flat).all()) or float(flat.norm()) == 0.0:
        raise UpdateError("the update is all zeros or not finite; there is nothing to invert.")
    keep = None
    if masks is not None:
        masks = strip_prefixes(masks)
        keep = torch.cat([masks[n].reshape(-1) for n in names]).to(device).float()
    return flat, keep


def _batch_statistics_only(model: nn.Module) -> Callable[[], None]:
    """Make every BatchNorm of ``model`` normalise with batch statistics (as the site did in train mode) without
    updating its running statistics, which the functional transforms cannot (an in-place write to a captured
    buffer); returns the function that restores them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flags = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False

    def restore() -> None:
        for m, flag in zip(norms, flags, strict=True):
            m.track_running_stats = flag

    return restore


def reconstruct(
    update: ModelUpdate | Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    threat_model: ThreatModel,
    loss: torch.nn.Module,
    mask: torch.Tensor | None = None,
    *,
    iterations: int = 1000,
    restarts: int = 4,
    step_size: float = 0.1,
    tv_weight: float = 5e-2,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reconstruct the batch behind a captured update by gradient inversion (Eq. 1).

    Args:
        update: the captured :class:`ModelUpdate` (or its ``delta`` dict): ``local - global`` weights. Sparse
            updates are matched on their shared coordinates only.
        model: the network holding the *global* weights the round started from (not modified).
        threat_model: what the attacker knows (shape, classes, ``K``, lr, clip, pixel range, mask known).
        loss: the bundle's training loss (e.g. ``DiceCELoss(to_onehot_y=True, softmax=True)``).
        mask: the victim's label maps ``(B, 1, *spatial)`` when ``threat_model.mask_known``.
        iterations: Adam steps per restart.
        restarts: random initialisations optimised side by side.
        step_size: Adam learning rate on the image (and mask logits).
        tv_weight: ``alpha`` of Eq. 1.
        generator: random source of the initialisations (seeded by the caller).
        num_threads: CPU threads for the attack (restored afterwards); 1 is much faster on a shared or small CPU,
            where intra-op threads of many tiny kernels fight each other. ``None`` leaves torch's setting.
        vectorize: run the restarts with ``vmap``; falls back to a loop if the model cannot be vmapped.

    Returns:
        ``(reconstruction, stats)``: the winning batch ``(B, C, *spatial)`` and a dict with ``matching_loss`` (of
        the winner), ``restart_losses``, ``iterations``, ``seconds``, ``iterations_per_second``, ``vectorized``
        and ``mask`` (the winner's label maps: the known ones, or the argmax of the optimised mask logits).

    Example:
        >>> tm = ThreatModel(image_shape=(64, 64), num_classes=3)
        >>> x, stats = reconstruct(delta, net, tm, loss, mask=label[None], iterations=500,
        ...                        generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    """
    tm = threat_model
    if iterations < 1 or restarts < 1:
        raise ValueError(f"iterations and restarts must be >= 1, got {iterations}, {restarts}.")
    if tm.mask_known and mask is None:
        raise ValueError("threat_model.mask_known is True but no mask was given.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()  # the site trained in train mode; restored below
    restore_tracking = _batch_statistics_only(model)
    params = strip_prefixes({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    buffers = strip_prefixes({n: b.detach() for n, b in model.named_buffers()})
    names = list(params)
    target, keep = _flatten_update(update, names, device)
    if keep is not None:
        target = target * keep
    soft_loss = soft_target_loss(loss)
    lo, hi = tm.pixel_range
    shape = tm.input_shape
    mask_shape = (tm.batch_size, tm.num_classes, *tm.image_shape)
    known_soft = None
    sigmoid = tm.activation == "sigmoid"
    if tm.mask_known:
        assert mask is not None
        if sigmoid:  # one binary channel per region, as the site's loss saw it
            known_soft = (mask.to(device) > 0).float().reshape(mask_shape)
        else:
            labels = mask.to(device).long().reshape(tm.batch_size, *tm.image_shape)
            known_soft = F.one_hot(labels, tm.num_classes).movedim(-1, 1).float()

    def dummy_delta(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = replay_update(model, params, buffers, soft_loss, x, y, tm)
        flat = torch.cat([p[n].reshape(-1) for n in names])
        return flat * keep if keep is not None else flat

    def objective(x: torch.Tensor, mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if known_soft is not None:
            y = known_soft
        else:
            y = torch.sigmoid(mask_logits) if sigmoid else torch.softmax(mask_logits, dim=1)
        match = cosine_matching_loss(dummy_delta(x, y), target)
        return match + tv_weight * total_variation(x), match

    grad_fn = grad(objective, argnums=(0, 1), has_aux=True)
    x = (lo + (hi - lo) * torch.rand((restarts, *shape), generator=generator)).to(device).requires_grad_(True)
    logits = (0.1 * torch.randn((restarts, *mask_shape), generator=generator)).to(device).requires_grad_(True)
    trainable = [x] if tm.mask_known else [x, logits]
    optimizer = torch.optim.Adam(trainable, lr=step_size)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def run_all(fn: Callable, xs: torch.Tensor, ms: torch.Tensor) -> Any:
        nonlocal vectorize
        if vectorize:
            try:
                return vmap(fn)(xs, ms)
            except (RuntimeError, NotImplementedError):  # an op without a batching rule: loop instead
                vectorize = False
        flat = [tree_flatten(fn(xs[r], ms[r])) for r in range(xs.shape[0])]
        stacked = [torch.stack([leaves[i] for leaves, _ in flat]) for i in range(len(flat[0][0]))]
        return tree_unflatten(stacked, flat[0][1])

    with cpu_threads(num_threads):
        start = time.perf_counter()
        for _ in range(iterations):
            (gx, gm), _match = run_all(grad_fn, x.detach(), logits.detach())
            optimizer.zero_grad(set_to_none=True)
            x.grad = gx.sign()
            if not tm.mask_known:
                logits.grad = gm.sign()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
        seconds = time.perf_counter() - start
        _total, match = run_all(objective, x.detach(), logits.detach())
    model.train(was_training)
    restore_tracking()
    best = int(torch.argmin(match))
    if tm.mask_known:
        assert known_soft is not None
        mask_out = known_soft.cpu() if sigmoid else known_soft.argmax(dim=1, keepdim=True).cpu()
    elif sigmoid:
        mask_out = (logits[best].detach() > 0).float().cpu()
    else:
        mask_out = logits[best].detach().argmax(dim=1, keepdim=True).cpu()
    stats = {
        "matching_loss": float(match[best]),
        "restart_losses": [float(m) for m in match],
        "winner": best,
        "iterations": iterations,
        "restarts": restarts,
        "seconds": seconds,
        "iterations_per_second": iterations / seconds if seconds > 0 else float("inf"),
        "vectorized": vectorize,
        "mask_known": tm.mask_known,
        "mask": mask_out,
    }
    return x[best].detach().cpu(), stats
