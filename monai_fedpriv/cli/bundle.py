"""``monai-fedpriv bundle check DIR [DIR ...]``: the model zoo's minimum checks, offline, one line per problem."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["bundle_main"]


def bundle_main(argv: list[str]) -> int:
    from monai_fedpriv.bundle.zoo_check import bundle_problems

    p = argparse.ArgumentParser(prog="monai-fedpriv bundle",
                                description="Check bundles offline against the MONAI model zoo's minimum: required "
                                "files (LICENSE, docs/README.md, docs/data_license.txt), the metadata keys the bundle "
                                "specification requires, the version in the changelog, indent-4 JSON, weights.")
    p.add_argument("action", choices=("check",))
    p.add_argument("bundles", nargs="+", type=Path, help="bundle folders")
    args = p.parse_args(argv)
    problems = [line for root in args.bundles for line in bundle_problems(root)]
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{len(args.bundles)} bundle(s) pass the model zoo's minimum checks.")
    return 1 if problems else 0
