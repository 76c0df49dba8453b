"""FedReplay's server phase against the bundle's own trainer on the same tensors, side by side in one run.

Both train the FLAIR bundle's primary model (the U-Net after its first block) for one pass over the same pooled
latents (random tensors of the shape the encoder gives at ``--size``), with the same batch size, loss and optimiser:

* ``server_phase``: :class:`monai_fedpriv.fl.replay.LatentTrainer` (the bundle's ``train#trainer`` built from its
  config on the pool, as a server round runs it);
* ``bundle_trainer``: MONAI's ``SupervisedTrainer`` built directly on the primary model and a plain ``DataLoader``.

Usage:
    python benchmarks/fedreplay_server.py --size 96 --items 64 --repeats 5 --json runs/bench/fedreplay_server.json

Target (issue 18): ``server_phase / bundle_trainer`` close to 1 (the server phase *is* the bundle's trainer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.fl.messages import LatentUpload
from monai_fedpriv.fl.replay import LatentTrainer
from monai_fedpriv.fl.simulator.server_model import initial_network
from monai_fedpriv.fl.weights import exchangeable_state
from monai_fedpriv.networks.unet_cut import encoder_and_primary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import emit, interleaved_medians  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brain_tumour_2d_flair"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    overrides = {"patch_size": [args.size, args.size], "batch_size": 8, "dataset_dir": None}
    bundle = BundleSpec(BUNDLE, ("train.json",), overrides)
    _, network = initial_network(bundle, 0)
    weights = exchangeable_state(network)
    encoder, primary = encoder_and_primary(network, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = encoder(torch.randn(args.items, 3, args.size, args.size, generator=g))
    labels = (torch.rand(args.items, 1, args.size, args.size, generator=g) > 0.8).float()
    server = LatentTrainer(bundle, 0, "cpu", {}, cut_block=1)
    server.receive([LatentUpload("site-1", 1, latents, labels, {"labels": "mask"})])
    items = [{"image": latents[i], "label": labels[i]} for i in range(args.items)]

    def server_phase() -> None:
        server.train(2, weights)

    def bundle_trainer() -> None:
        _, net = initial_network(bundle, 0)
        _, prim = encoder_and_primary(net, 1)
        loader = DataLoader(items, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
        SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=prim,
                          optimizer=torch.optim.Adam(prim.parameters(), 1e-4),
                          loss_function=DiceCELoss(sigmoid=True)).run()  # fmt: skip

    runs = {"server_phase": server_phase, "bundle_trainer": bundle_trainer}
    med = interleaved_medians(runs, args.repeats)
    out = {"size": args.size, "items": args.items, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
           "median_seconds": med, "server_phase_over_bundle_trainer": med["server_phase"] / med["bundle_trainer"]}
    emit(out, args.json)


if __name__ == "__main__":
    main()
