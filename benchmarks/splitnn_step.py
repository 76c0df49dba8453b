"""SplitNN's per-batch exchange in process against the same network's local step, side by side in one run.

Three ways of taking one training step of the FLAIR bundle's U-Net (16-32-64-128-256, instance norm, 3 channels,
one output) on the same batch, interleaved, median over repetitions:

* ``local``: the unsplit network, one Adam step over all parameters;
* ``split``: the U-shaped split of :mod:`monai_fedpriv.fl.split` (site part + ``CodecLink`` + ``SplitServer``, each
  exchange encoded and decoded through the codec, one Adam step on each side);
* ``split_memory``: the same split over the in-memory ``LocalLink`` (no codec), to separate the cost of the cut
  from the cost of the bytes.

Usage:
    python benchmarks/splitnn_step.py --size 224 --batch 8 --repeats 7 --json runs/bench/splitnn_step.json

Target (issue 18): ``split / local <= 1.20``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.fl.split import CodecLink, SplitServer, install_split
from monai_fedpriv.networks import build_network
from monai_fedpriv.networks.unet_cut import LocalLink, RemoteCall, server_part, unet_levels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import emit, interleaved_medians  # noqa: E402


def _step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
    opt.step()


class _MemorySkip(torch.nn.Module):
    def __init__(self, link: LocalLink) -> None:
        super().__init__()
        self.link = link

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        return torch.cat([x1, RemoteCall.apply(x1, self.link, torch.is_grad_enabled())], 1)


def _setups(size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base = build_network("unet", in_channels=3, out_channels=1, spatial_dims=2)
    local = copy.deepcopy(base)
    split = copy.deepcopy(base)
    server = SplitServer(copy.deepcopy(base), lambda part: torch.optim.Adam(part.parameters(), 1e-4))
    link = CodecLink("site-1", server)
    install_split(split, link)
    server.begin("site-1", 1, {k: v.detach() for k, v in base.state_dict().items()})
    memory = copy.deepcopy(base)
    mem_server = server_part(memory)
    mem_link = LocalLink(mem_server, torch.optim.Adam(mem_server.parameters(), 1e-4))
    unet_levels(memory)  # a MONAI UNet
    memory.model[1] = _MemorySkip(mem_link)
    site_params = lambda net: [p for p in net.parameters() if p.requires_grad]  # noqa: E731
    return {
        "local": (local, torch.optim.Adam(local.parameters(), 1e-4)),
        "split": (split, torch.optim.Adam(site_params(split), 1e-4)),
        "split_memory": (memory, torch.optim.Adam(site_params(memory), 1e-4)),
        "_link": link,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    setups = _setups(args.size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 0.8).float()
    runs = {name: (lambda name=name: _step(*setups[name], x, y)) for name in ("local", "split", "split_memory")}
    med = interleaved_medians(runs, args.repeats)
    link = setups["_link"]
    out = {"size": args.size, "batch": args.batch, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
           "median_seconds": med, "split_over_local": med["split"] / med["local"],
           "split_memory_over_local": med["split_memory"] / med["local"],
           "bytes_per_step": (link.bytes_sent + link.bytes_received) / (args.repeats + 1)}  # fmt: skip
    emit(out, args.json)


if __name__ == "__main__":
    main()
