"""Loaders of DP-SGD: Poisson sampling of samples or of patients, empty draws turned into noise-only steps.

* :class:`PatientPoissonSampler`: the patient privacy unit. Each step includes every patient independently with
  probability ``q`` (Poisson sampling of patients, not of slices or crops) and, for an included patient, up to
  ``items_per_patient`` of its items (all of them with ``None``), drawn from the same generator. The accountant is
  given the patient sample rate ``q = expected patients per step / patients at the site``.
* :class:`PublicMixSampler`: FedAvg+Share (:mod:`monai_fedpriv.data.share_pool`). Items marked ``"public": True``
  are outside the private data set: the private items (or patients) are Poisson-sampled at ``q = expected units per
  step / private units`` (the rate the accountant gets), and every public item (or public patient) joins each step
  independently with the same probability ``q``, drawn from a separate generator. So the pool is mixed in as if the
  site trained on private + pool, and its draws never depend on the private data or on the private draws. Privacy:
  a public item's gradient is clipped like any other, and adding or removing one private unit changes the clipped sum
  by at most the clip norm whatever public items are in the step (public and private units are disjoint; the public
  part is the same in both neighbouring data sets); the public draws are independent of private data, so the step
  stays the subsampled Gaussian mechanism of rate ``q`` over the private units.
* :class:`NoiseOnEmptyDataLoader`: an empty draw still releases noise (the accounting assumes one noised step per
  draw), but MONAI's ``SupervisedTrainer`` cannot process a zero-sized batch, so the loader takes that noise-only step
  itself and moves on.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, Sampler

from monai_fedpriv.errors import PrivacyBudgetExceeded, PrivacyConfigError
from monai_fedpriv.privacy.grad_sample import empty_like_batch

__all__ = [
    "EmptySafeCollate",
    "NoiseOnEmptyDataLoader",
    "PatientPoissonSampler",
    "PublicMixSampler",
    "patients_of",
    "public_flags",
    "worker_settings",
]


class EmptySafeCollate:
    """Collate for Poisson batches: an empty batch becomes tensors with a zero batch dimension, same structure.

    Opacus' wrapper learns the structure from the first non-empty batch and fails on dict samples when the very
    first batch is empty; this one collates ``dataset[0]`` to learn it instead (only shapes/dtypes are kept).
    """

    def __init__(self, collate_fn: Any, dataset: Any) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self.template: Any = None

    def __call__(self, items: list[Any]) -> Any:
        if items:
            out = self.collate_fn(items)
            if self.template is None:
                self.template = empty_like_batch(out)
            return out
        if self.template is None:
            # read through a SeededDataset's base: only shapes are kept, and its item counter must not move
            base = getattr(self.dataset, "base", self.dataset)
            self.template = empty_like_batch(self.collate_fn([base[0]]))
        return self.template


class PatientPoissonSampler(Sampler[list[int]]):
    """Batches of item indices drawn by Poisson sampling of patients.

    Args:
        patients: the patient id of every item of the dataset, in dataset order.
        sample_rate: probability ``q`` in (0, 1] that a patient takes part in a step.
        generator: the only source of randomness (patients and items).
        items_per_patient: items taken from an included patient (uniformly without replacement), or ``None`` for
            all of its items.
        steps: batches per pass (default ``round(1 / q)``: each patient expected once per pass).

    Example:
        >>> s = PatientPoissonSampler(["a", "a", "b"], 0.5, torch.Generator().manual_seed(0), items_per_patient=1)
        >>> len(s)
        2
    """

    def __init__(
        self,
        patients: Sequence[Hashable],
        sample_rate: float,
        generator: torch.Generator,
        items_per_patient: int | None = 1,
        steps: int | None = None,
    ) -> None:
        if not patients:
            raise PrivacyConfigError("PatientPoissonSampler needs at least one item.")
        if not 0 < sample_rate <= 1:
            raise PrivacyConfigError(f"patient sample rate must be in (0, 1], got {sample_rate!r}.")
        if items_per_patient is not None and (isinstance(items_per_patient, bool) or items_per_patient < 1):
            raise PrivacyConfigError(f"items_per_patient must be an int >= 1 or None (all), got {items_per_patient!r}.")
        self.items: dict[Hashable, list[int]] = {}
        for index, patient in enumerate(patients):
            self.items.setdefault(patient, []).append(index)
        self.order = list(self.items)
        self.sample_rate = float(sample_rate)
        self.generator = generator
        self.items_per_patient = items_per_patient
        self.steps = int(steps) if steps is not None else max(1, round(1.0 / self.sample_rate))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.order)
        for _ in range(self.steps):
            included = torch.rand(n, generator=self.generator) < self.sample_rate
            batch: list[int] = []
            for k in torch.nonzero(included).reshape(-1).tolist():
                members = self.items[self.order[k]]
                if self.items_per_patient is None or self.items_per_patient >= len(members):
                    batch.extend(members)
                else:
                    pick = torch.randperm(len(members), generator=self.generator)[: self.items_per_patient]
                    batch.extend(members[i] for i in sorted(pick.tolist()))
            yield batch


class PublicMixSampler(Sampler[list[int]]):
    """Each step: a private batch and, independently, a public one, as dataset indices (private first).

    Args:
        private: batch sampler over positions in ``private_index`` (Poisson over private items or patients).
        public: batch sampler over positions in ``public_index``, with its own generator; it must not be driven by
            anything private.
        private_index, public_index: the dataset index of each private / public item.

    Example:
        >>> from opacus.utils.uniform_sampler import UniformWithReplacementSampler as U
        >>> s = PublicMixSampler(U(num_samples=2, sample_rate=1.0), U(num_samples=1, sample_rate=1.0), [0, 2], [1])
        >>> next(iter(s))
        [0, 2, 1]
    """

    def __init__(
        self, private: Sampler[list[int]], public: Sampler[list[int]], private_index: Sequence[int],
        public_index: Sequence[int],
    ) -> None:  # fmt: skip
        if len(private) != len(public):  # type: ignore[arg-type]
            raise PrivacyConfigError("private and public samplers must take the same number of steps.")
        self.private, self.public = private, public
        self.private_index, self.public_index = list(private_index), list(public_index)
        self.sample_rate = getattr(private, "sample_rate", None)

    def __len__(self) -> int:
        return len(self.private)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for mine, shared in zip(self.private, self.public, strict=True):
            yield [self.private_index[i] for i in mine] + [self.public_index[i] for i in shared]


def _data_list(dataset: Any) -> Sequence[Any] | None:
    base = dataset
    while not hasattr(base, "data") and hasattr(base, "base"):
        base = base.base
    data = getattr(base, "data", base if isinstance(base, list) else None)
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        return None
    return data


def public_flags(dataset: Any) -> list[bool]:
    """Whether each item of a dataset is declared public (``"public": True`` in its data list, read through
    wrappers; a plain list of dicts is its own data list). All ``False`` when there is no data list to read.

    Raises:
        PrivacyConfigError: public items are declared but the data list does not match the dataset's length.
    """
    from monai_fedpriv.data.share_pool import is_public

    data = _data_list(dataset)
    if data is None:
        return [False] * len(dataset)
    flags = [is_public(item) for item in data]
    if any(flags) and len(flags) != len(dataset):
        raise PrivacyConfigError(
            f"the data list has {len(flags)} items but the dataset {len(dataset)}: cannot tell public items apart."
        )
    return flags if any(flags) else [False] * len(dataset)


def patients_of(dataset: Any, key: str = "patient") -> list[Hashable]:
    """The patient id of every item of a MONAI dataset (read from its data list, through wrappers).

    Raises:
        PrivacyConfigError: the dataset has no data list, or an item lacks ``key``.
    """
    base = dataset
    while not hasattr(base, "data") and hasattr(base, "base"):
        base = base.base
    data = getattr(base, "data", None)
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise PrivacyConfigError(
            f"privacy_unit='patient' needs the patient of every item, but {type(base).__name__} has no data list."
        )
    missing = [i for i, item in enumerate(data) if not isinstance(item, Mapping) or key not in item]
    if missing:
        raise PrivacyConfigError(
            f"privacy_unit='patient' needs a {key!r} key on every training item; items {missing[:5]} lack it."
        )
    return [item[key] for item in data]


def _batch_len(batch: Any) -> int | None:
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else None
    values = list(batch.values()) if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    if isinstance(batch, (list, tuple)) and len(batch) == 0:
        return 0
    for v in values:
        n = _batch_len(v)
        if n is not None:
            return n
    return None


class NoiseOnEmptyDataLoader(DataLoader):
    """Poisson loader that never hands an empty batch to the training loop.

    An empty draw still has to release noise (the accounting assumes one noised step per draw), but MONAI's
    ``SupervisedTrainer`` cannot process a zero-sized batch (``decollate_batch`` fails, InstanceNorm rejects it). So
    the loader itself takes the noise-only step (``optimizer.zero_grad(); optimizer.step()``, counted in the ledger)
    and moves on to the next draw. If that step would pass a privacy budget (``PrivacyBudgetExceeded`` from a
    budget guard), iteration ends.

    ``public_units`` is the number of public items (or patients) mixed into the steps outside the accounting (set by
    :func:`~monai_fedpriv.privacy.dp_sgd.make_site_private`; 0 without a FedAvg+Share pool).
    """

    public_units: int = 0

    def __init__(self, loader: DataLoader, optimizer: DPOptimizer) -> None:
        super().__init__(
            loader.dataset,
            batch_sampler=loader.batch_sampler,
            collate_fn=loader.collate_fn,
            # Not the sampler's generator: every new iterator draws a worker base seed from this one, which would
            # shift the Poisson draws by how often the iterator was restarted (a resumed run restarts it once more).
            generator=_derived_generator(loader.generator),
            **worker_settings(loader),
        )
        self.optimizer = optimizer
        self.sample_rate = getattr(loader, "sample_rate", None)
        self.empty_steps = 0

    def __iter__(self):  # type: ignore[override]
        for batch in super().__iter__():
            if _batch_len(batch) == 0:
                self.optimizer.zero_grad()
                try:
                    self.optimizer.step()
                except PrivacyBudgetExceeded:
                    return
                self.empty_steps += 1
                continue
            yield batch


def worker_settings(loader: DataLoader) -> dict[str, Any]:
    """How ``loader`` runs its workers, to carry over to the loader that replaces it."""
    names = ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context", "prefetch_factor",
             "persistent_workers")  # fmt: skip
    return {name: getattr(loader, name) for name in names}


def _derived_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None:
        return None
    return torch.Generator().manual_seed((generator.initial_seed() * 2862933555777941757 + 3037000493) % 2**63)
