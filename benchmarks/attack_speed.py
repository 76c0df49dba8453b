"""Iterations per second of the gradient-inversion attack on the default bundle network (2D, 64x64, batch 1).

Compares restarts run with ``vmap`` against a Python loop, on CPU (with the given thread counts) and on CUDA when
one is present. Prints one JSON line per setting.

Usage::

    python benchmarks/attack_speed.py --iterations 20 --restarts 1 4 --threads 1 2
"""

from __future__ import annotations

import argparse
import json

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from monai_fedpriv.attacks import ThreatModel, build_victim_update, intensity_label, reconstruct


def bench(device: str, restarts: int, vectorize: bool, threads: int | None, iterations: int, size: int) -> dict:
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (16, 32, 64, 128), (2, 2, 2), norm="INSTANCE", num_res_units=1).to(device)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    image = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    label = intensity_label(image[0], 3)[None]
    delta = build_victim_update(net, loss, image.to(device), label.to(device))
    tm = ThreatModel((size, size), 3)
    reconstruct(delta, net, tm, loss, mask=label, iterations=2, restarts=restarts, vectorize=vectorize,
                num_threads=threads)  # warm-up  # fmt: skip
    _, stats = reconstruct(delta, net, tm, loss, mask=label, iterations=iterations, restarts=restarts,
                           vectorize=vectorize, num_threads=threads)  # fmt: skip
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": threads if device == "cpu" else None,
        "restarts": restarts,
        "vectorized": stats["vectorized"],
        "size": size,
        "iterations_per_second": round(stats["iterations_per_second"], 2),
        "restart_iterations_per_second": round(stats["iterations_per_second"] * restarts, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--restarts", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for threads in args.threads if device == "cpu" else [None]:
            for restarts in args.restarts:
                for vectorize in (True, False):
                    row = bench(device, restarts, vectorize, threads, args.iterations, args.size)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
