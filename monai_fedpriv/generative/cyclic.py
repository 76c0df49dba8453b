"""The generator half of CWT+Replay (Qu et al., seed paper 004, Algorithm 1 lines 8-21), one site's visit at a time.

The auxiliary generator travels from site to site (cyclic weight transfer). At site ``k`` it starts from the weights
the previous site returned, keeps a frozen copy ``D_old`` of itself, and trains on batches that are the union of
site ``k``'s real (image, mask) pairs and as many pairs replayed by ``D_old`` from the codes ``e`` of the earlier sites
(all of them if fewer). At the end of the visit the site returns the generator and ``e`` extended with the codes of
its own real data. :func:`replay_pairs` then decodes replayed pairs for the segmentation half (lines 1-7).

Every random draw (shuffling, choice of replayed codes) uses the caller's :class:`torch.Generator`; the global RNG is
never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from monai_fedpriv.generative.generator import ReplayGenerator

__all__ = ["VisitResult", "replay_pairs", "train_generator_at_site"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class VisitResult:
    """What a site hands on after training the generator.

    Attributes
    ----------
    codes
        ``(N_old + N_site, *latent)`` int64: the codes received, then the site's own codes in data order.
    losses
        The generator loss of every optimiser step, in order.
    replayed
        Number of replayed pairs trained on during the visit (0 at the first site).
    """

    codes: torch.Tensor
    losses: list[float] = field(default_factory=list)
    replayed: int = 0


def _draw(n: int, count: int, rng: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices out of ``range(n)``, drawn with ``rng``."""
    if not 0 <= count <= n:
        raise ValueError(f"cannot draw count={count} distinct codes out of {n}.")
    return torch.randperm(n, generator=rng)[:count]


def replay_pairs(
    generator: ReplayGenerator, codes: torch.Tensor, count: int, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``count`` distinct codes drawn with ``rng`` into replayed ``(images, masks)``.

    Parameters
    ----------
    generator
        The generator whose decoder synthesises the pairs (``D`` in Algorithm 1).
    codes
        ``(N, *latent)`` int64 codes.
    count
        How many pairs, ``1 <= count <= N``.
    rng
        Draws which codes are decoded.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    return generator.decode_pairs(codes[_draw(len(codes), count, rng).to(codes.device)])


def _batches(real: Iterable[Batch] | Batch, batch_size: int | None, rng: torch.Generator | None) -> Iterator[Batch]:
    """Yield ``(images, masks)`` batches: slices of a tensor pair (shuffled when ``rng`` is given), or the iterable."""
    if _is_pair(real):
        images, masks = real
        if batch_size is None or batch_size < 1:
            raise ValueError("batch_size (>= 1) is required when real is an (images, masks) tensor pair.")
        if len(images) != len(masks) or len(images) == 0:
            raise ValueError(f"real images and masks must be non-empty and equally long, got {len(images)} and "
                             f"{len(masks)}.")  # fmt: skip
        order = torch.randperm(len(images), generator=rng) if rng is not None else torch.arange(len(images))
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            yield images[idx], masks[idx]
        return
    for batch in real:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("each batch of real must be an (images, masks) pair.")
        yield batch[0], batch[1]


def _is_pair(real: object) -> bool:
    return isinstance(real, (tuple, list)) and len(real) == 2 and all(isinstance(t, torch.Tensor) for t in real)


def _device(generator: ReplayGenerator) -> torch.device:
    return next(generator.parameters()).device


def _check_old_codes(generator: ReplayGenerator, codes: torch.Tensor, images: torch.Tensor) -> None:
    expected = generator.latent_shape(images.shape[2:])
    if codes.ndim != generator.spatial_dims + 1 or tuple(codes.shape[1:]) != expected:
        raise ValueError(f"codes must be (N, {', '.join(map(str, expected))}) for this site's images of spatial size "
                         f"{tuple(images.shape[2:])}, got {tuple(codes.shape)}.")  # fmt: skip


def train_generator_at_site(
    generator: ReplayGenerator,
    real: Iterable[Batch] | Batch,
    codes: torch.Tensor | None,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    generator_rng: torch.Generator,
    batch_size: int | None = None,
) -> VisitResult:
    """Train the generator at one site (Algorithm 1, "Updating generator in institution"), in place.

    Parameters
    ----------
    generator
        The generator as received from the previous site; trained in place (the caller passes it on).
    real
        The site's data: an ``(images, masks)`` tensor pair (shuffled each epoch with ``generator_rng``, cut into
        ``batch_size`` batches) or a re-iterable of ``(images, masks)`` batches such as a list or a ``DataLoader``.
    codes
        Codes of the earlier sites, ``(N_old, *latent)`` int64, or ``None`` at the first site (no replay).
    epochs
        Local epochs ``M``.
    optimizer
        Optimiser over ``generator``'s parameters.
    generator_rng
        Draws the shuffling and the replayed codes.
    batch_size
        Required with a tensor pair; ignored for an iterable.

    Returns
    -------
    VisitResult
        ``codes`` = the received codes (unchanged) followed by ``generator.encode_codes`` of the site's real data in
        data order (a tensor pair unshuffled; an iterable as it iterates), computed after the last step.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if not _is_pair(real) and iter(real) is real:
        raise ValueError("real must be a tensor pair or a re-iterable (a list, a DataLoader), not a one-shot iterator.")
    device = _device(generator)
    old_codes = codes.to(device) if codes is not None and len(codes) > 0 else None
    if old_codes is not None:
        generator.check_codes(old_codes)
    # D_old: frozen at the start of the visit; replay never sees what this site teaches the generator
    frozen = copy.deepcopy(generator).eval().requires_grad_(False) if old_codes is not None else None
    losses: list[float] = []
    replayed = 0
    generator.train()
    for _ in range(epochs):
        for images, masks in _batches(real, batch_size, generator_rng):
            images, masks = images.to(device), masks.to(device)
            if masks.ndim == images.ndim - 1:
                masks = masks.unsqueeze(1)
            if frozen is not None and old_codes is not None:
                _check_old_codes(generator, old_codes, images)
                n_replay = min(len(images), len(old_codes))
                old_images, old_masks = replay_pairs(frozen, old_codes, n_replay, generator_rng)
                images, masks = torch.cat([images.float(), old_images]), torch.cat([masks.float(), old_masks])
                replayed += n_replay
            optimizer.zero_grad()
            loss = generator.loss(images, masks)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    generator.eval()  # handed on in eval mode: replay_pairs / encode_codes are deterministic either way
    in_order = _batches(real, batch_size, None)
    new_codes = torch.cat([generator.encode_codes(i.to(device), m.to(device)) for i, m in in_order])
    if old_codes is not None:
        new_codes = torch.cat([old_codes, new_codes])
    return VisitResult(codes=new_codes, losses=losses, replayed=replayed)
