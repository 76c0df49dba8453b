"""A site's side of CWT+Replay (seed 004, Algorithm 1): a generator visit (train the generator it is handed on its
own (image, mask) items plus pairs replayed by the generator as received, and return it with the codes of its
items appended), and the segmentation rounds' replay (the site's training set is its real items followed by
replayed pairs decoded from every earlier site's codes, refreshed every round).

The replayed pairs take the place of extra items in the bundle's own training stream (:class:`ReplayMix`), so the
bundle's trainer, loss and optimiser run unchanged; a replayed item has the keys and types of a real one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import Dataset

from monai_fedpriv.data.stream import StreamSampler, derive_seed
from monai_fedpriv.errors import DataError
from monai_fedpriv.fl.messages import GeneratorState
from monai_fedpriv.fl.replay.upload import _items, dataset_items
from monai_fedpriv.generative.cyclic import replay_pairs, train_generator_at_site
from monai_fedpriv.generative.generator import ReplayGenerator, build_generator

__all__ = ["ReplayMix", "fill_replay", "generator_visit", "install_replay", "read_generator", "site_generator"]

#: the generator's learning rate (the seed's eta_G = 4e-4 with Adam)
GENERATOR_LR = 4e-4


class ReplayMix(Dataset):
    """A site's training items followed by ``slots`` replayed groups (each shaped as one case's items)."""

    def __init__(self, base: Dataset, slots: int) -> None:
        self.base = base
        self.slots = int(slots)
        self.replay: list[list[dict[str, Any]]] = []

    @property
    def transform(self) -> Any:  # the stream seeds the real items' random transforms through it
        return getattr(self.base, "transform", None)

    def __len__(self) -> int:
        return len(self.base) + self.slots  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        n = len(self.base)  # type: ignore[arg-type]
        if index < n:
            return self.base[index]
        if not self.replay:
            raise IndexError("no replayed pairs yet: the generator phase has not ended.")
        return copy.copy(self.replay[(index - n) % len(self.replay)])


def install_replay(site: Any) -> ReplayMix:
    """Put a :class:`ReplayMix` under ``site``'s stream (as many replayed groups as it has cases); the stream and
    the site's sample count cover the mix from the start, so every segmentation round trains on both."""
    seeded = site.trainer.data_loader.dataset
    first = _items(seeded.base[0])[0]
    label = torch.as_tensor(first["label"])
    if label.shape[0] != 1 or not bool(((label == 0) | (label == 1)).all()):
        raise DataError(f"{site.name}: --strategy cwt-replay's generator models one binary mask per item; this "
                        f"bundle's labels are {list(label.shape)} with values beyond 0 and 1 (a sigmoid bundle with "
                        f"one region, such as brain_tumour_2d_flair, fits).")  # fmt: skip
    mix = ReplayMix(seeded.base, len(seeded.base))
    seeded.base = mix
    sampler = site.trainer.data_loader.sampler
    if isinstance(sampler, StreamSampler):
        sampler.n_items = 2 * len(mix.base)  # type: ignore[arg-type]
    site.sync.n_samples = 2 * len(mix.base)  # type: ignore[arg-type]
    return mix


def _pairs(site: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    images, labels, per_case = dataset_items(site.trainer.data_loader.dataset, seed)
    if labels.shape[1] != 1 or not bool(((labels == 0) | (labels == 1)).all()):
        raise DataError(f"{site.name}: CWT+Replay's generator models one binary mask per item; this bundle's labels "
                        f"are {list(labels.shape[1:])} with values beyond 0 and 1.")  # fmt: skip
    return images, labels, per_case


def read_generator(data: bytes) -> GeneratorState:
    """The generator a site is handed, from untrusted bytes (``UpdateError`` on anything but a generator)."""
    from monai_fedpriv.errors import UpdateError
    from monai_fedpriv.fl.codec import decode

    message = decode(data)
    if not isinstance(message, GeneratorState):
        raise UpdateError(f"the task's generator is a {type(message).__name__}, not a generator.")
    return message


def site_generator(state: GeneratorState | None, images: torch.Tensor, seed: int) -> ReplayGenerator:
    """The generator a site was handed (``None``: the first site builds it from the run seed)."""
    generator = build_generator(images.dim() - 2, int(images.shape[1]), seed=derive_seed(seed, "generator-init"))
    if state is not None:
        generator.load_state_dict(state.weights)
    return generator


def generator_visit(site: Any, state: GeneratorState | None, rnd: int, seed: int, epochs: int) -> GeneratorState:
    """Algorithm 1's "updating generator in institution": train on real plus replayed pairs, return the generator
    and the codes so far followed by those of this site's items."""
    images, labels, _ = _pairs(site, derive_seed(seed, site.name, "generator-items"))
    generator = site_generator(state, images, seed)
    optimizer = torch.optim.Adam(generator.parameters(), lr=GENERATOR_LR)
    rng = torch.Generator().manual_seed(derive_seed(seed, site.name, "generator-visit", rnd))
    with torch.random.fork_rng(devices=[]):
        result = train_generator_at_site(generator, (images, labels), None if state is None else state.codes,
                                         epochs=epochs, optimizer=optimizer, generator_rng=rng,
                                         batch_size=int(site.batch_size))  # fmt: skip
    weights = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
    return GeneratorState(site.name, rnd, weights, result.codes.cpu(), {"losses": result.losses[-3:],
                                                                         "replayed": result.replayed})  # fmt: skip


def fill_replay(site: Any, mix: ReplayMix, state: GeneratorState, rnd: int, seed: int) -> int:
    """Decode this round's replayed pairs into ``mix`` (as many items as the site's own, grouped as its cases'
    items, keys and types taken from a real item); returns the number of pairs."""
    base = mix.base
    template = _items(base[0])[0]
    per_case = len(_items(base[0]))
    count = min(int(state.items), len(base) * per_case)  # type: ignore[arg-type]
    generator = site_generator(state, torch.as_tensor(template["image"])[None].float(), seed)
    rng = torch.Generator().manual_seed(derive_seed(seed, site.name, "replay", rnd))
    images, masks = replay_pairs(generator, state.codes, count, rng)
    items = []
    for image, mask in zip(images, masks, strict=True):
        item = dict(template)
        item["image"] = _like(template["image"], image)
        item["label"] = _like(template["label"], mask)
        items.append(item)
    mix.replay = [items[i : i + per_case] for i in range(0, len(items), per_case)]
    return len(items)


def _like(template: Any, value: torch.Tensor) -> Any:
    """``value`` with the type (a MetaTensor keeps its metadata) and dtype of ``template``."""
    out = value.to(torch.as_tensor(template).dtype)
    if hasattr(template, "copy_meta_from"):
        meta_tensor = template.clone()
        meta_tensor.data = out
        return meta_tensor
    return out
