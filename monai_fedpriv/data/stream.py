"""Reproducible, resumable sample streams for site training.

A site's training data is consumed as one endless stream: pass ``p`` is a permutation of the data set drawn from
``seed`` and ``p``; the stream position is the number of samples consumed. Every random transform applied to the
sample at position ``k`` is seeded from ``(seed, k)``, so the exact batches and augmentations of a run depend only on
the config, not on worker scheduling, and a run resumed at a round boundary (position = iterations x batch size)
continues with identical data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset, Sampler

__all__ = ["StreamSampler", "SeededDataset", "make_stream_loader", "derive_seed"]

_MAX_SEED = 2**31 - 1


def derive_seed(*parts: Any) -> int:
    """Stable 31-bit seed from any printable parts (independent of Python's hash randomisation)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") % _MAX_SEED


class StreamSampler(Sampler):
    """Yields ``(index, position)`` pairs from an endless sequence of seeded permutations.

    Each ``__iter__`` yields ``epoch_length * batch_size`` pairs starting at :attr:`position`, so every batch is full
    and ``position == iteration * batch_size`` at any iteration boundary.

    Args:
        n_items: size of the data set (> 0).
        batch_size: samples per batch.
        seed: stream seed.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        if n_items <= 0:
            raise ValueError(f"StreamSampler needs a non-empty data set, got n_items={n_items}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size should be > 0, got {batch_size}.")
        self.n_items = int(n_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.position = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @property
    def epoch_length(self) -> int:
        return -(-self.n_items // self.batch_size)

    def __len__(self) -> int:
        return self.epoch_length * self.batch_size

    def _permutation(self, p: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != p:
            rng = np.random.default_rng(derive_seed(self.seed, "pass", p))
            self._perm_cache = (p, rng.permutation(self.n_items))
        return self._perm_cache[1]

    def item_at(self, position: int) -> int:
        return int(self._permutation(position // self.n_items)[position % self.n_items])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.position
        for pos in range(start, start + len(self)):
            self.position = pos + 1
            yield self.item_at(pos), pos

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "n_items": self.n_items}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("position", "seed", "n_items"):
            if key not in state:
                raise KeyError(f"StreamSampler state lacks required key {key!r}.")
        if state["seed"] != self.seed or state["n_items"] != self.n_items:
            raise ValueError(
                f"sampler state is for seed={state['seed']}, n_items={state['n_items']}; "
                f"this sampler has seed={self.seed}, n_items={self.n_items}."
            )
        self.position = int(state["position"])


class SeededDataset(Dataset):
    """Wraps a MONAI dataset so that ``dataset[(index, position)]`` applies its random transforms with a seed
    derived from ``(seed, position)``. Plain integer indices are passed through unchanged.

    Works with ``monai.data.Dataset``, ``CacheDataset`` and any dataset whose ``transform`` is a MONAI
    ``Randomizable`` (e.g. ``Compose``). Integer indices (e.g. when a DP-SGD Poisson loader replaces the stream)
    are numbered in the order they are read: the ``k``-th integer-indexed item is transformed with a seed derived
    from ``(seed, k)``. The counter is in :meth:`state_dict`, so a run resumed from a checkpoint continues with
    the same augmentations (single-process loading; worker prefetch would read ahead of the training loop).
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = int(seed)
        self.int_reads = 0  # integer-indexed items served so far

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, position = key
            transform = getattr(self.base, "transform", None)
            if isinstance(transform, Randomizable):
                transform.set_random_state(seed=derive_seed(self.seed, "item", position))
            return self.base[index]
        transform = getattr(self.base, "transform", None)
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=derive_seed(self.seed, "int-index", self.int_reads))
        self.int_reads += 1
        return self.base[key]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "int_reads": self.int_reads}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "int_reads"):
            if key not in state:
                raise KeyError(f"SeededDataset state lacks required key {key!r}.")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"dataset state is for seed={state['seed']}, this dataset has seed={self.seed}.")
        self.int_reads = int(state["int_reads"])


def make_stream_loader(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, **kwargs: Any
) -> torch.utils.data.DataLoader:
    """A data loader over ``dataset`` driven by a :class:`StreamSampler`, collating like MONAI's ``DataLoader``
    (``list_data_collate``) but drawing nothing from the global random state.

    Example::

        loader = make_stream_loader(train_ds, batch_size=8, seed=derive_seed(0, "site-1"))
        loader.sampler.position  # samples consumed so far
    """
    from monai.data import list_data_collate

    sampler = StreamSampler(len(dataset), batch_size, seed)  # type: ignore[arg-type]
    kwargs.setdefault("collate_fn", list_data_collate)
    return torch.utils.data.DataLoader(
        SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers, **kwargs
    )
