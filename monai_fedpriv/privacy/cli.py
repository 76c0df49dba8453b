"""``monai-fedpriv privacy``: epsilon of a DP-SGD run, or the noise multiplier that meets a target epsilon.

Example:
    $ monai-fedpriv privacy --sample-rate 0.01 --noise-multiplier 1.0 --steps 1000 --delta 1e-5
    sample_rate=0.01, steps=1000, delta=1e-05
    accountant  noise_multiplier   epsilon
    rdp                   1.0000    2.1014
    prv                   1.0000    1.8384
    $ monai-fedpriv privacy --sample-rate 0.01 --steps 1000 --delta 1e-5 --target-epsilon 3.58 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.privacy.accounting import ACCOUNTANTS, PrivacyLedger
from monai_fedpriv.privacy.calibration import solve_noise_multiplier

__all__ = ["build_parser", "privacy_main"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the ``privacy`` options to ``parser`` (a sub-parser of the main CLI) or to a new parser."""
    parser = parser or argparse.ArgumentParser(
        prog="monai-fedpriv privacy", description="Epsilon of Poisson-sampled DP-SGD, or the noise for a target."
    )
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q (batch / N).")
    parser.add_argument("--steps", type=int, required=True, help="number of DP-SGD steps T.")
    parser.add_argument("--delta", type=float, required=True, help="target delta, e.g. 1e-5.")
    parser.add_argument("--noise-multiplier", type=float, help="sigma; required unless --target-epsilon is given.")
    parser.add_argument("--target-epsilon", type=float, help="solve for the smallest sigma reaching this epsilon.")
    parser.add_argument(
        "--accountant", choices=ACCOUNTANTS, action="append", help="accountant(s) to use (default: all)."
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table.")
    return parser


def _rows(args: argparse.Namespace) -> list[dict[str, float | str]]:
    accountants = args.accountant or list(ACCOUNTANTS)
    rows: list[dict[str, float | str]] = []
    for acc in accountants:
        if args.target_epsilon is not None:
            sigma = solve_noise_multiplier(args.target_epsilon, args.sample_rate, args.steps, args.delta, acc)
        else:
            sigma = args.noise_multiplier
        ledger = PrivacyLedger()
        ledger.record_sampled_gaussian(args.sample_rate, sigma, steps=args.steps)
        rows.append({"accountant": acc, "noise_multiplier": sigma, "epsilon": ledger.epsilon(args.delta, acc)})
    return rows


def privacy_main(argv: list[str] | None = None) -> int:
    """Run the ``privacy`` subcommand; returns the exit status (0 ok, 2 bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        parser.error("give exactly one of --noise-multiplier and --target-epsilon.")
    try:
        rows = _rows(args)
    except PrivacyConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = {"sample_rate": args.sample_rate, "steps": args.steps, "delta": args.delta}
    if args.target_epsilon is not None:
        settings["target_epsilon"] = args.target_epsilon
    if args.json:
        print(json.dumps({**settings, "results": rows}, indent=2))
        return 0
    print(", ".join(f"{k}={v}" for k, v in settings.items()))
    print(f"{'accountant':<11} {'noise_multiplier':>16} {'epsilon':>9}")
    for row in rows:
        print(f"{row['accountant']:<11} {row['noise_multiplier']:>16.4f} {row['epsilon']:>9.4f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(privacy_main())
