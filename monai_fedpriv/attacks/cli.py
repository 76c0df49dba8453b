"""``monai-fedpriv attack``: measure what one shared update of a bundle's network leaks about one image.

The command builds the bundle's network (``network_def`` of ``configs/train.json``) and loss, replays a site's local
round on the victim image (DP-SGD as in a named regime of seed 000, Table 1), attacks the update with gradient
inversion (Eq. 1 of seed 004) and writes ``attack.json`` and ``attack.png`` into the output folder.

Example::

    monai-fedpriv attack bundles/brain_tissue_2d --victim t1.nii.gz --privacy none --output runs/attack
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.attacks.audit import (
    DELTA,
    attack_image,
    build_share_filter,
    bundle_activation,
    load_bundle_model,
    load_checkpoint,
    load_victim,
    release_epsilon,
)
from monai_fedpriv.attacks.figures import save_reconstruction_grid
from monai_fedpriv.attacks.threat_model import PRIVACY_REGIMES
from monai_fedpriv.utils.files import write_json

__all__ = [
    "DELTA",
    "attack_image",
    "attack_main",
    "build_parser",
    "build_share_filter",
    "load_bundle_model",
    "load_victim",
    "release_epsilon",
    "run_attack",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monai-fedpriv attack", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle_dir", help="MONAI bundle folder with configs/train.json defining network_def")
    p.add_argument("--victim", default=None, help="victim image: NIfTI, DICOM or PNG (a 2D image or a volume)")
    p.add_argument(
        "--data",
        default=None,
        help="instead of --victim: an MSD or BraTS folder; the victim is --case, as the network sees it",
    )
    p.add_argument("--layout", choices=("msd", "brats"), default=None, help="layout of --data (default: detected)")
    p.add_argument("--case", type=int, default=0, help="with --data: index of the training case (default 0)")
    p.add_argument("--victim-label", default=None, help="victim label map; default: intensity classes of the image")
    p.add_argument("--slice", type=int, default=None, dest="slice_index", help="slice of a volume (default: middle)")
    p.add_argument("--size", type=int, default=64, help="victim image side after resizing (default 64)")
    p.add_argument("--privacy", choices=sorted(PRIVACY_REGIMES), default="none", help="DP-SGD regime (seed 000)")
    p.add_argument("--noise-multiplier", type=float, default=None, help="custom DP-SGD noise (overrides --privacy)")
    p.add_argument("--max-grad-norm", type=float, default=None, help="custom DP-SGD clip (with --noise-multiplier)")
    p.add_argument("--share", choices=["none", "percentile", "svt"], default="none",
                   help="filter on the update after DP-SGD (Li et al. 2019): selective sharing or SVT")  # fmt: skip
    p.add_argument("--share-fraction", type=float, default=None, help="fraction of coordinates shared (default 0.1)")
    p.add_argument("--share-clip", type=float, default=None,
                   help="clip gamma of shared values (percentile: none, svt: 1e-3)")  # fmt: skip
    p.add_argument("--svt-threshold", type=float, default=None, help="SVT threshold h (default 5e-4)")
    p.add_argument("--svt-epsilon", type=float, default=None, help="SVT selection budget eps1+eps2 (default 1)")
    p.add_argument("--svt-epsilon3", type=float, default=None, help="SVT answer budget eps3 (default 1)")
    p.add_argument("--local-steps", type=int, default=1, help="local SGD steps behind the update (default 1)")
    p.add_argument("--lr", type=float, default=0.01, help="local SGD learning rate (default 0.01)")
    p.add_argument("--mask", choices=["known", "unknown"], default="known", help="does the attacker know the mask")
    p.add_argument("--iterations", type=int, default=1000, help="attack iterations (default 1000)")
    p.add_argument("--restarts", type=int, default=4, help="random restarts run side by side (default 4)")
    p.add_argument("--tv-weight", type=float, default=5e-2, help="total-variation weight alpha of Eq. 1")
    p.add_argument("--latent-cuts", default=None, metavar="N,M",
                   help="also invert FedReplay's latents of the same victim at these cuts (e.g. 1,2; seed 004 Table "
                   "2): attack.json's 'leakage' rows, scored as the update")  # fmt: skip
    p.add_argument("--latent-noise-multiplier", type=float, default=None,
                   help="with --latent-cuts: also invert the latents after the latent Gaussian mechanism (clip 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the DP noise and the attack's initialisation")
    p.add_argument("--checkpoint", default=None, help="weights to load into the network (the global model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the attack (1 is best on a busy CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output", required=True, help="output folder for attack.json and attack.png")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before any work: one ``OptionError`` naming the flag."""
    from monai_fedpriv.cli.options import OptionError, check_number, check_share_flags

    if (args.victim is None) == (args.data is None):
        raise OptionError("give exactly one of --victim IMAGE and --data DIR.")
    if args.data is None and (args.layout is not None or args.case != 0):
        raise OptionError("--layout and --case need --data.")
    if args.data is not None and (args.victim_label is not None or args.slice_index is not None):
        raise OptionError("--victim-label and --slice go with --victim; with --data the case's own label is used.")
    for flag, value, low in (
        ("--iterations", args.iterations, 1),
        ("--restarts", args.restarts, 1),
        ("--local-steps", args.local_steps, 1),
        ("--size", args.size, 8),
        ("--case", args.case, 0),
    ):
        check_number(flag, value, low=low, integer=True)  # fmt: skip
    check_number("--lr", args.lr, low=0, low_open=True)
    check_number("--tv-weight", args.tv_weight, low=0)
    check_number("--noise-multiplier", args.noise_multiplier, low=0)
    check_number("--max-grad-norm", args.max_grad_norm, low=0, low_open=True)
    check_share_flags(args)
    check_number("--threads", args.threads, low=1, integer=True)
    check_number("--latent-noise-multiplier", args.latent_noise_multiplier, low=0, low_open=True)
    if args.latent_noise_multiplier is not None and args.latent_cuts is None:
        raise OptionError("--latent-noise-multiplier goes with --latent-cuts.")
    latent_cuts(args)
    if args.device is not None:
        from monai_fedpriv.cli.options import check_device

        check_device(args.device)


def latent_cuts(args: argparse.Namespace) -> tuple[int, ...]:
    """The cuts of ``--latent-cuts`` (``OptionError`` naming the flag on anything but positive integers)."""
    from monai_fedpriv.cli.options import OptionError

    if args.latent_cuts is None:
        return ()
    try:
        cuts = tuple(int(c) for c in str(args.latent_cuts).split(",") if c.strip())
    except ValueError:
        cuts = ()
    if not cuts or any(c < 1 for c in cuts):
        raise OptionError(f"--latent-cuts {args.latent_cuts!r}: comma-separated encoder depths >= 1, e.g. 1,2.")
    return cuts


def _leakage(args: argparse.Namespace, network: Any, loss: Any, image: Any, label: Any, pixel_range: Any,
             record: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """Seed 004's Table 2 for this victim: the update just attacked, then FedReplay's latents at each cut."""
    from monai_fedpriv.attacks.leakage import leakage_rows

    update = {"method": "fedavg", "what": "update", "cut_block": None, "ssim": record["ssim"], "psnr": record["psnr"],
              "latent_mechanism": False, "epsilon": record.get("epsilon"), "victim": 0, "dice": None}  # fmt: skip
    noise = (None,) if args.latent_noise_multiplier is None else (None, args.latent_noise_multiplier)
    rows = leakage_rows(network, [(image, label)], loss=loss, pixel_range=pixel_range,
                        activation=bundle_activation(args.bundle_dir), cut_blocks=latent_cuts(args),
                        latent_noise=noise, include_update=False, iterations=args.iterations,
                        restarts=args.restarts, seed=args.seed, num_threads=args.threads)  # fmt: skip
    return [update, *rows]


def run_attack(args: argparse.Namespace) -> dict[str, Any]:
    """Run the attack described by parsed CLI arguments and write the outputs; returns the JSON record."""
    check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    victim: dict[str, Any] = {}
    if args.data is not None:
        from monai_fedpriv.attacks.victims import victim_from_dataset

        image, label, overrides, victim = victim_from_dataset(args.bundle_dir, args.data, args.case, args.layout)
        network, loss, _ = load_bundle_model(args.bundle_dir, overrides)
        pixel_range = (float(image.min()), float(image.max()))  # the adapted (normalised) intensities
        source = "label"
    else:
        network, loss, pixel_range = load_bundle_model(args.bundle_dir)
    if args.checkpoint:
        # with --data the victim is the network's input; a --victim is resized to --size later
        example = image[None].repeat(2, *[1] * image.dim()) if args.data is not None else args.size
        network = load_checkpoint(network, args.checkpoint, example)
    network = network.to(device).train()
    if args.data is None:
        out_channels = int(getattr(network, "out_channels", 0)) or None
        if out_channels is None:
            with torch.no_grad():
                out_channels = int(network(torch.zeros(1, 1, args.size, args.size, device=device)).shape[1])
        image, label, source = load_victim(
            args.victim, args.victim_label, out_channels, pixel_range, args.slice_index, args.size
        )
    given = {"fraction": args.share_fraction, "clip": args.share_clip, "threshold": args.svt_threshold,
             "epsilon_select": args.svt_epsilon, "epsilon3": args.svt_epsilon3}  # fmt: skip
    share_filter = build_share_filter(  # the filter's own defaults for what was not given
        args.share, seed=args.seed, **{k: v for k, v in given.items() if v is not None}
    )
    record, recon = attack_image(
        network, loss, image, label, pixel_range, privacy=args.privacy, noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm, share_filter=share_filter, share=args.share,
        local_steps=args.local_steps, lr=args.lr, mask_known=args.mask == "known", iterations=args.iterations,
        restarts=args.restarts, tv_weight=args.tv_weight, seed=args.seed, num_threads=args.threads,
        activation=bundle_activation(args.bundle_dir),
    )  # fmt: skip
    record["mask_source"] = source
    if args.latent_cuts is not None:
        record["leakage"] = _leakage(args, network, loss, image, label, pixel_range, record)
    if victim:
        record["victim"] = victim
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    title = f"privacy={record['privacy']}, share={args.share}, mask {args.mask}, SSIM {record['ssim']:.2f}"
    save_reconstruction_grid([(title, image, recon)], out / "attack.png", pixel_range)
    write_json(record, out / "attack.json")
    return record


def attack_main(argv: list[str] | None = None) -> int:
    """Entry point of ``monai-fedpriv attack``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    record = run_attack(args)
    print(f"{record['verdict']}: PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.3f} -> {args.output}")
    return 0
