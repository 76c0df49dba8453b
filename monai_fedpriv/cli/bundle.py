"""``monai-fedpriv bundle check DIR [DIR ...] [--weights]``: the model zoo's minimum checks, offline, one line per
problem; ``monai-fedpriv bundle export RUN --output DIR``: a finished run's global model as a bundle."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["bundle_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monai-fedpriv bundle", description="MONAI bundles as the model zoo expects them.")
    sub = p.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", description="Check bundles offline against the MONAI model zoo's minimum: "
                           "required files (LICENSE, docs/README.md, docs/data_license.txt), the metadata keys the "
                           "bundle specification requires, the version in the changelog, monai_fedpriv's version, "
                           "indent-4 JSON, weights loaded from bundle_root/models, large_files.yml entries, the README "
                           "template's sections.")  # fmt: skip
    check.add_argument("bundles", nargs="+", type=Path, help="bundle folders")
    check.add_argument("--weights", action="store_true",
                       help="also require the weights the configs load (in models/ or large_files.yml), as the zoo's "
                       "TorchScript step does")  # fmt: skip
    export = sub.add_parser("export", description="Write the bundle a finished run trained, with the run's global "
                            "model in models/model.pt, a new version in the changelog and the run's strategy, Dice and "
                            "epsilon per site in metadata.json (federated_training).")  # fmt: skip
    export.add_argument("run", type=Path, help="a simulate or run-nvflare output folder")
    export.add_argument("--output", type=Path, required=True, help="the new bundle folder")
    export.add_argument("--version", default=None, help="the bundle's new version (default: the next patch version)")
    export.add_argument("--bundle", type=Path, default=None,
                        help="the bundle folder the run trained (default: the one its metrics.json names; needed for a "
                        "run-nvflare run, whose metrics name the folder inside the job)")  # fmt: skip
    return p


def bundle_main(argv: list[str]) -> int:
    from monai_fedpriv.bundle.zoo_check import bundle_problems

    args = _parser().parse_args(argv)
    if args.action == "export":
        from monai_fedpriv.bundle.export import export_run

        if args.version is not None and not re.fullmatch(r"\d+\.\d+\.\d+", args.version):
            from monai_fedpriv.cli.options import OptionError

            raise OptionError(f"--version {args.version!r}: give MAJOR.MINOR.PATCH.")
        out = export_run(args.run, args.output, args.version, bundle=args.bundle)
        print(f"bundle: {out} (weights in models/model.pt)")
        bundles, weights = [out], True
    else:
        bundles, weights = args.bundles, args.weights
    problems = [line for root in bundles for line in bundle_problems(root, require_weights=weights)]
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{len(bundles)} bundle(s) pass the model zoo's minimum checks.")
    return 1 if problems else 0
