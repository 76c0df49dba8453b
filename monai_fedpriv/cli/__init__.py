"""Command line: ``monai-fedpriv simulate | export-nvflare | run-nvflare | privacy | attack | data | configs``.

Bad input (a flag, a bundle id, a data file, a privacy setting) ends with one ``error:`` line naming it and exit
code 2, also when the error was raised inside MONAI's config parser (which wraps it); a federation that had to
stop ends with one ``error:`` line and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

__all__ = ["COMMANDS", "main", "user_error"]

COMMANDS = {
    "simulate": ("monai_fedpriv.cli.simulate", "simulate_main", "federated training of a bundle over in-process "
                 "sites (+ baselines, report)"),
    "privacy": ("monai_fedpriv.privacy.cli", "privacy_main", "epsilon of DP-SGD for (sample rate, noise "
                "multiplier, steps, delta)"),
    "export-nvflare": ("monai_fedpriv.cli.nvflare", "export_main", "write a federated run as an NVIDIA FLARE 2.9 "
                       "job (same flags as simulate)"),
    "run-nvflare": ("monai_fedpriv.cli.nvflare", "run_nvflare_main", "run an exported job in NVFlare's simulator "
                    "or POC mode; metrics.json + report"),
    "attack": ("monai_fedpriv.attacks.cli", "attack_main", "gradient-inversion audit of one site's update"),
    "data": ("monai_fedpriv.cli", "data_main", "build the embedded default data set, or a synthetic MSD / BraTS "
             "folder to try the task bundles"),
    "configs": ("monai_fedpriv.cli", "configs_main", "paths of the shared override files (fed, budget, dp, svt...) "
                "for python -m monai.bundle run"),
    "compare": ("monai_fedpriv.cli.compare", "compare_main", "a grid of simulations (strategies x partitions): "
                "Dice against label skew, centralised, bytes, CWT forgetting"),
    "bundle": ("monai_fedpriv.cli.bundle", "bundle_main", "check a bundle offline against the MONAI model zoo's "
               "minimum (bundle check DIR); a finished run's model as a bundle (bundle export RUN --output DIR)"),
}  # fmt: skip


def _usage() -> str:
    lines = [f"  {name:<14} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "usage: monai-fedpriv {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(lines)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-input error behind ``exc`` (itself, or one it wraps), or ``None`` when it is not one."""
    from monai_fedpriv.cli.options import OptionError
    from monai_fedpriv.errors import BundleError, DataError, PrivacyConfigError, ResumeError, UpdateError

    kinds = (OptionError, BundleError, DataError, PrivacyConfigError, ResumeError, UpdateError, FileNotFoundError)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__  # explicit wraps only (MONAI re-raises "from" the original)
    return None


def data_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="monai-fedpriv data",
        description="Build the embedded default data set (and print its folder), or with --synthetic a small "
        "SYNTHETIC data set (phantoms, not medical data) in a real layout, to try the task bundles without real "
        "data: msd = an MSD Task03_Liver-like CT task (for bundles/liver_ct_2d), brats = a BraTS 2020-like release "
        "with four MR modalities and two institutions (for bundles/brain_tumour_2d_flair and brain_tumour_3d).",
    )
    p.add_argument("--output", type=Path, default=None, help="target folder (default $MONAI_FEDPRIV_DATA or cache; "
                   "required with --synthetic)")  # fmt: skip
    p.add_argument("--synthetic", choices=("msd", "brats"), default=None, help="write a synthetic data set instead")
    p.add_argument("--cases", type=int, default=None, help="synthetic cases (default 12)")
    p.add_argument("--seed", type=int, default=None, help="seed of the synthetic data (default 0)")
    args = p.parse_args(argv)
    if args.synthetic is None:
        from monai_fedpriv.cli.options import refuse_given
        from monai_fedpriv.data.brain_tissue import ensure_default_data

        refuse_given([("--cases", args.cases), ("--seed", args.seed)], "--synthetic")
        print(ensure_default_data(args.output))
        return 0
    from monai_fedpriv.data.examples import write_example_dataset

    print(write_example_dataset(args.synthetic, args.output, args.cases, args.seed))
    return 0


def configs_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="monai-fedpriv configs",
        description="Print the paths of monai_fedpriv's shared override files, e.g. to merge budget.json and dp.json "
        "into a bundle run: python -m monai.bundle run --config_file \"['configs/train.json', '$(monai-fedpriv "
        "configs budget.json)', '$(monai-fedpriv configs dp.json)']\"",
    )
    p.add_argument("names", nargs="*", help="override file names (default: list them all)")
    args = p.parse_args(argv)
    from monai_fedpriv.bundle.loader import shared_config, shared_config_names

    names = args.names or shared_config_names()
    for name in names:
        print(shared_config(name))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} (monai-fedpriv --help).",
              file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from monai_fedpriv.errors import FederationError

    module, func, _ = COMMANDS[argv[0]]
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except FederationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        cause = user_error(exc)
        if cause is None:
            raise
        # bad input: one clear message (it names the file, key, flag or setting), no traceback
        print(f"error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
