"""A site's side of FedReplay's upload (seed 004, Algorithm 2, lines 1-3): encode every training item once with
the auxiliary encoder (the first ``cut_block`` blocks of the global model it was sent) and send the latents with
their labels, through the site's filter chain. Without a filter covering the latents (the Gaussian mechanism of
:mod:`monai_fedpriv.privacy.filters.latents`) the upload is refused unless the site opted in with
``--latents-unprotected``; the upload then says ``protected: false``.

The items are the bundle's training items as its own preprocessing makes them (crops, slices, augmentation seeded
per item from the site's seed), so the server trains on what the site would have trained on; ``items_per_unit``
(the most items one case gave) is what the mechanism's sensitivity needs.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import Randomizable

from monai_fedpriv.data.stream import derive_seed
from monai_fedpriv.fl.messages import LatentUpload
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.fl.weights import load_exchangeable_state
from monai_fedpriv.networks.unet_cut import encoder_and_primary
from monai_fedpriv.privacy.grad_sample import plain_copy

__all__ = ["UNPROTECTED_FLAG", "dataset_items", "encode_dataset", "site_upload", "upload_message"]

UNPROTECTED_FLAG = "--latents-unprotected"


def _items(sample: Any) -> list[dict[str, Any]]:
    return list(sample) if isinstance(sample, (list, tuple)) else [sample]


def dataset_items(dataset: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(images, labels, items_per_unit)``: every training item of ``dataset`` as the bundle's preprocessing makes
    it (one pass; a random transform seeded per case from ``seed``), and the most items one case gave."""
    base = dataset
    while hasattr(base, "base"):  # the stream's seeding wrapper, CWT+Replay's mix: the site's own items only
        base = base.base
    transform = getattr(base, "transform", None)
    images, labels, per_case = [], [], 1
    for index in range(len(base)):
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=derive_seed(seed, "upload", index))
        items = _items(base[index])
        per_case = max(per_case, len(items))
        images += [torch.as_tensor(p["image"]).float() for p in items]
        labels += [torch.as_tensor(p["label"]).float() for p in items]
    return torch.stack(images), torch.stack(labels), per_case


def encode_dataset(encoder: torch.nn.Module, dataset: Any, seed: int, batch: int = 16) -> tuple[torch.Tensor,
                                                                                               torch.Tensor, int]:
    """``(latents, labels, items_per_unit)`` of every item of ``dataset`` (:func:`dataset_items`) under
    ``encoder``."""
    images, labels, per_case = dataset_items(dataset, seed)
    with torch.no_grad():
        latents = torch.cat([encoder(images[i : i + batch]).detach().cpu() for i in range(0, len(images), batch)])
    return latents, labels, per_case


def site_upload(site: Any, model: GlobalModel, rnd: int, unprotected: bool) -> LatentUpload:
    """Encode ``site``'s training items with the encoder of ``model`` and filter the upload through the site's
    chain (``PrivacyConfigError`` when nothing covers the latents and ``unprotected`` is false; a refused release
    sends nothing)."""
    site.sync.chain.require_covered(LatentUpload.kind, unprotected, UNPROTECTED_FLAG)
    instruction = model.instruction_for(site.name)
    network = plain_copy(site.network)
    load_exchangeable_state(network, model.weights)
    encoder, primary = encoder_and_primary(network, int(instruction.cut_block or 1))
    encoder.eval()
    with site.rng.active():
        latents, labels, per_case = encode_dataset(encoder, site.trainer.data_loader.dataset,
                                                   derive_seed(site.name, "upload", rnd))  # fmt: skip
    from monai_fedpriv.bundle.loader import parser_get

    labels, encoding = _label_rows(labels, primary, latents, parser_get(site.parser, "eval_activation") or "softmax")
    meta = {"items_per_unit": per_case, "protected": False, "labels": encoding}
    return site.sync.chain(LatentUpload(site.name, rnd, latents, labels, meta))


def _label_rows(labels: torch.Tensor, primary: torch.nn.Module, latents: torch.Tensor,
                activation: str) -> tuple[torch.Tensor, str]:  # fmt: skip
    """Labels as the upload carries them, by the bundle's output convention (never by what a site's data hold, which
    would tell the server whether the site has a class): a sigmoid bundle's binary region masks as they are
    (``"mask"``), a softmax bundle's class-index maps one-hot over the network's output channels (``"onehot"``:
    values in [0, 1], so the latent mechanism's bound holds; the server takes the argmax back)."""
    if activation == "sigmoid":
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("a sigmoid bundle's labels should be binary region masks.")
        return labels, "mask"
    with torch.no_grad():
        classes = int(primary.eval()(latents[:1]).shape[1])
    if labels.shape[1] != 1 or int(labels.max()) >= classes or int(labels.min()) < 0:
        raise ValueError(f"labels {list(labels.shape[1:])} with values up to {float(labels.max()):g} are neither "
                         f"masks nor class indices below the network's {classes} outputs.")  # fmt: skip
    onehot = torch.nn.functional.one_hot(labels[:, 0].long(), classes)
    return onehot.movedim(-1, 1).to(torch.float32), "onehot"


def upload_message(site: Any, model: GlobalModel, rnd: int, seed: int, unprotected: bool, generator: Any = None) -> Any:
    """What ``site`` sends in an upload round, through its filter chain, the same for every transport: FedReplay's
    latent upload, or (instruction phase ``"generator"``) CWT+Replay's generator visit of the ``generator`` it was
    handed. Either is refused when nothing covers it and the site did not opt in (``PrivacyConfigError``)."""
    from monai_fedpriv.fl.messages import GeneratorState

    instruction = model.instruction_for(site.name)
    if instruction.phase != "generator":
        return site_upload(site, model, rnd, unprotected)
    from monai_fedpriv.generative.site import generator_visit

    site.sync.chain.require_covered(GeneratorState.kind, unprotected, UNPROTECTED_FLAG)
    with site.rng.active():
        visit = generator_visit(site, generator, rnd, seed, instruction.epochs or 1)
    return site.sync.chain(visit)
