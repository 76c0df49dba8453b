"""The flags that define a federated run, shared by ``monai-fedpriv simulate`` (in-process sites) and
``monai-fedpriv export-nvflare`` (an NVIDIA FLARE job), and their range checks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from monai_fedpriv.cli.options import (
    MAX_SEED,
    check_device,
    check_number,
    check_output_folder,
    refuse_given,
)
from monai_fedpriv.cli.strategy import add_strategy_flags, strategy_from_args
from monai_fedpriv.fl.server.screening import ScreenSettings
from monai_fedpriv.privacy.budget import StopPolicy

__all__ = ["add_run_flags", "check_run_flags"]


def _default(settings_type: type, name: str) -> Any:
    """The default of a settings dataclass field: the settings tree holds every default, the flags repeat none."""
    return settings_type.__dataclass_fields__[name].default  # type: ignore[attr-defined]


def _job(name: str) -> Any:
    from monai_fedpriv.fl.nvflare.settings import JobSettings

    return _default(JobSettings, name)


def add_run_flags(p: argparse.ArgumentParser, deploy: bool = False) -> argparse.ArgumentParser:
    """Add the flags that define a federated run to ``p``; ``deploy`` (``export-nvflare``) leaves out what only
    the in-process simulator does (``--resume``, ``--baselines``, ``--device``, reports) and adds the job's own
    flags (name, noise source, timeouts)."""
    from monai_fedpriv.data.partition import SCHEMES
    from monai_fedpriv.fl.simulator.faults import FAULT_KINDS

    p.add_argument("bundle_dir", type=Path, help="MONAI bundle directory (with configs/train.json)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    work = p.add_mutually_exclusive_group()
    work.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (default 1)")
    work.add_argument("--local-steps", type=int, default=None, help="local optimiser steps per round")
    p.add_argument(
        "--partition",
        choices=SCHEMES,
        default=None,
        help="how cases are split onto sites (default: institution when the data name enough institutions, else iid)",
    )
    data = p.add_argument_group("your data (instead of the bundle's own data list)")
    data.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a Medical Segmentation Decathlon task folder or a BraTS release folder, as distributed",
    )
    data.add_argument("--layout", choices=("msd", "brats"), default=None, help="layout of --data (default: detected)")
    data.add_argument(
        "--institutions",
        type=Path,
        default=None,
        help="CSV with columns case,institution (for --partition institution)",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="patients per site held out for validation when the data set has no validation cases "
        "(default 0.2; at least one per site)",
    )
    p.add_argument("--seed", type=int, default=_job("seed"),
                   help=f"run seed, an integer in [0, 2**32 - 1] (default {_job('seed')})")  # fmt: skip
    if deploy:
        p.add_argument("--output", type=Path, required=True, help="the job folder to write (replaced if it exists)")
        p.add_argument("--name", default=None, help="job name (default: the job folder's name)")
        p.add_argument("--resume", action="store_true", help="a job that continues the federation saved by an earlier "
                       "job of the same settings after its last completed round (see docs/deployment.md)")  # fmt: skip
    else:
        p.add_argument("--resume", action="store_true", help="continue from the last completed round in --output")
        p.add_argument("--output", type=Path, required=True,
                       help="run directory (metrics.json, report.md, checkpoints)")  # fmt: skip
    p.add_argument(
        "--config-files", nargs="+", default=["train.json"],
        help="bundle config files merged in order, e.g. train.json fed.json (default train.json); names not in the "
        "bundle's configs/ are taken from monai_fedpriv's shared overrides",
    )  # fmt: skip
    p.add_argument("--momentum", choices=("restart", "local", "aggregate"), default=_job("momentum"),
                   help="client optimiser state across rounds (Li et al. 2019): default restart")  # fmt: skip
    server = p.add_argument_group("server (the strategy and how it screens updates)")
    add_strategy_flags(server)
    server.add_argument(
        "--min-sites",
        type=int,
        default=None,
        help="acceptable updates a round needs (default: all but one of its sites, at least 1)",
    )
    server.add_argument("--max-update-norm", type=float, default=None, help="reject updates whose L2 norm exceeds "
                        "this (under --secure-aggregation: every site clips its update to it)")  # fmt: skip
    sec = p.add_argument_group("secure aggregation (the server learns only the sum of the updates)")
    sec.add_argument("--secure-aggregation", action="store_true",
                     help="masks and Shamir-shared keys (Bonawitz et al. 2017): the server unmasks the sum of the "
                     "updates of the sites that sent theirs, never one site's; needs >= 3 sites and --max-update-norm")
    sec.add_argument("--secagg-threshold", type=int, default=None,
                     help="shares needed to unmask, and the fewest survivors (default: a majority, at least 2)")
    sec.add_argument("--secagg-bits", type=int, default=16, help="bits per coordinate of the ring (default 16)")
    sec.add_argument("--secagg-neighbours", type=int, default=None,
                     help="SecAgg+ (Bell et al. 2020): each site pairs with about K others instead of all (K rounded "
                     "up to an even number)")  # fmt: skip
    sec.add_argument("--distributed-dp", action="store_true",
                     help="each site adds its share of Skellam noise (std --noise-multiplier x --max-update-norm in "
                     "the sum of --secagg-threshold sites), accounted in its ledger")  # fmt: skip
    server.add_argument(
        "--norm-factor",
        type=float,
        default=_default(ScreenSettings, "norm_factor"),
        help=f"reject an update whose norm is this many times the median of the others (default "
        f"{_default(ScreenSettings, 'norm_factor'):g})",
    )
    server.add_argument(
        "--inject-fault",
        action="append",
        default=[],
        metavar="SITE:KIND:ROUND",
        help=f"inject a fault to test the federation, KIND in {FAULT_KINDS} (repeatable)",
    )
    if deploy:
        server.add_argument("--round-timeout", type=int, default=_job("round_timeout"), metavar="SECONDS",
                            help="seconds the server waits for a round's updates; a site that has not answered by "
                            f"then is rejected for the round with the reason (0: no limit; default "
                            f"{_job('round_timeout')})")  # fmt: skip
        server.add_argument(
            "--wait-after-min", type=int, default=_job("wait_after_min"),
            help=f"seconds the server keeps waiting for slower sites once --min-sites answered (default "
            f"{_job('wait_after_min')})",
        )  # fmt: skip
    else:
        server.add_argument(
            "--round-timeout", type=int, default=0, metavar="SECONDS",
            help="reject a site that has not sent its update SECONDS after it started the round, as NVIDIA FLARE's "
            "server does after export-nvflare --round-timeout: the in-process sites train one after another, so each "
            "gets SECONDS of wall time of its own; its engine is stopped at the first iteration boundary past them "
            "(or its update refused if it was sent late), the site goes back to its state at the start of the round "
            "with its privacy ledger kept as spent, and the round aggregates the others (0: no limit, the default)",
        )  # fmt: skip
        p.add_argument("--baselines", action="store_true",
                       help="also train centralised and local-only models with the same total epochs")  # fmt: skip
    priv = p.add_argument_group("privacy (DP-SGD at every site, Ziller et al. Table 1 regimes)")
    priv.add_argument(
        "--privacy",
        choices=("none", "low", "medium", "high", "custom"),
        default="none",
        help="add the shared dp.json with this regime (default none)",
    )
    priv.add_argument("--noise-multiplier", type=float, default=None, help="custom (or overridden) noise multiplier")
    priv.add_argument("--max-grad-norm", type=float, default=None, help="custom (or overridden) per-sample clip norm")
    priv.add_argument(
        "--privacy-unit",
        choices=("slice", "volume", "patient"),
        default=None,
        help="what one epsilon protects (default slice: one training item)",
    )
    priv.add_argument(
        "--items-per-patient",
        type=int,
        default=None,
        help="patient unit: items an included patient contributes per step (default 1)",
    )
    budget = p.add_argument_group("budget (one per site over DP-SGD, SVT and Gaussian update releases)")
    budget.add_argument(
        "--epsilon-budget",
        type=float,
        default=None,
        help="per-site epsilon budget (default: the regime's); no release passes it",
    )
    budget.add_argument("--delta", type=float, default=None, help="delta of every epsilon (default 1e-5)")
    budget.add_argument("--share-delta", type=float, default=None, dest="delta", help=argparse.SUPPRESS)
    budget.add_argument(
        "--budget-policy",
        choices=(StopPolicy.STOP_SITE.value, StopPolicy.STOP_FEDERATION.value),
        default=None,
        help="when a site's budget runs out: continue without it (default) or stop everyone",
    )
    budget.add_argument(
        "--accountant",
        choices=("rdp", "prv"),
        default=None,
        help="rdp (default; valid for every mix) or prv (Gaussian mechanisms only)",
    )
    if not deploy:  # a deployed site keeps its ledger store where its own operator says (docs/deployment.md)
        budget.add_argument(
            "--ledger-dir", type=Path, default=None,
            help="where each site's spent epsilon is kept across runs, per data set (default "
            "$MONAI_FEDPRIV_LEDGER_DIR or ~/.monai_fedpriv/ledgers); a new run on the same cases starts from it",
        )  # fmt: skip
        budget.add_argument(
            "--fresh-budget", action="store_true",
            help="start every site's budget at zero although earlier runs spent epsilon on the same cases (stated "
            "in metrics.json and the report; the earlier spending stays recorded)",
        )  # fmt: skip
    budget.add_argument(
        "--noise", choices=("seeded", "secure"), default="secure" if deploy else "seeded",
        help="where privacy noise comes from: seeded from --seed (reproducible, simulation only, not private) or "
        f"secure (OS entropy); default {'secure in an exported job' if deploy else 'seeded in simulation'}",
    )  # fmt: skip
    # the earlier spellings of --noise, kept working
    budget.add_argument("--secure-noise", dest="noise", action="store_const", const="secure", help=argparse.SUPPRESS)
    budget.add_argument("--seeded-noise", dest="noise", action="store_const", const="seeded", help=argparse.SUPPRESS)
    share = p.add_argument_group(
        "update sharing (Li et al. 2019, section 2.2): filters on what every site sends, after DP-SGD if any"
    )
    share.add_argument(
        "--share",
        choices=("none", "percentile", "svt", "gaussian"),
        default="none",
        help="percentile: largest fraction of |dw| (no DP); svt: sparse vector technique (pure DP per "
        "round); gaussian: clip the update norm and add Gaussian noise; default none",
    )
    share.add_argument("--share-fraction", type=float, default=None, help="fraction q shared (default 0.1)")
    share.add_argument(
        "--share-clip",
        type=float,
        default=None,
        help="clip gamma per local iteration (percentile: default none; svt: default 1e-3)",
    )
    share.add_argument(
        "--svt-epsilon",
        type=float,
        default=None,
        help="SVT selection budget eps1 + eps2 per round, split as Lyu et al. 2017 recommend (default 1)",
    )
    share.add_argument("--svt-epsilon3", type=float, default=None, help="SVT budget of the released values (default 1)")
    share.add_argument(
        "--svt-threshold", type=float, default=None, help="SVT public threshold h on |dw| (default gamma/2)"
    )
    share.add_argument("--gaussian-clip", type=float, default=None, help="L2 clip norm C of the update (gaussian)")
    share.add_argument("--gaussian-noise", type=float, default=None, help="noise multiplier sigma (gaussian)")
    latents = p.add_argument_group(
        "dataset uploads (--strategy fedreplay): what protects the latents and labels a site sends once"
    )
    latents.add_argument(
        "--latent-noise-multiplier", type=float, default=None,
        help="the Gaussian mechanism on the upload: noise std sigma*C per coordinate, one release in the site's "
        "budget (needs --epsilon-budget)",
    )  # fmt: skip
    latents.add_argument("--latent-clip", type=float, default=None,
                         help="L2 clip norm C of each item's latent (default 1)")  # fmt: skip
    latents.add_argument(
        "--latents-unprotected", action="store_true",
        help="send the latents and labels with no mechanism (they give the images back: see the leakage table); "
        "metrics.json and the report say so",
    )  # fmt: skip
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="ID=JSON",
        help="bundle config override applied last, e.g. --override learning_rate=0.001 (repeatable)",
    )
    if not deploy:
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
        p.add_argument("--threads", type=int, default=None, help="CPU threads torch may use (default: torch's)")
        p.add_argument("--no-report", action="store_true", help="skip report.md and figures")
        from monai_fedpriv.cli.tracking import add_tracking_flags

        add_tracking_flags(p)
    return p


def check_run_flags(args: argparse.Namespace) -> None:
    """Refuse bad values of the run flags (one message naming the flag)."""
    check_number("--sites", args.sites, low=1, integer=True)
    check_number("--rounds", args.rounds, low=1, integer=True)
    check_number("--seed", args.seed, low=0, high=MAX_SEED, integer=True)
    check_output_folder(args.output)
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    check_number("--local-epochs", args.local_epochs, low=1, integer=True)
    check_number("--local-steps", args.local_steps, low=1, integer=True)
    check_number("--min-sites", args.min_sites, low=1, high=args.sites, integer=True)
    check_number("--max-update-norm", args.max_update_norm, low=0, low_open=True)
    check_number("--norm-factor", args.norm_factor, low=1, low_open=True)
    check_number("--val-fraction", args.val_fraction, low=0, high=1, high_open=True)
    check_number("--threads", getattr(args, "threads", None), low=1, integer=True)
    if args.data is None:
        refuse_given([("--layout", args.layout), ("--institutions", args.institutions),
                      ("--val-fraction", args.val_fraction)], "--data")  # fmt: skip
    check_number("--round-timeout", getattr(args, "round_timeout", None), low=0, integer=True)
    check_number("--wait-after-min", getattr(args, "wait_after_min", None), low=0, integer=True)
    if not args.secure_aggregation:
        refuse_given([("--secagg-threshold", args.secagg_threshold), ("--secagg-neighbours", args.secagg_neighbours),
                      ("--secagg-bits", None if args.secagg_bits == 16 else args.secagg_bits),
                      ("--distributed-dp", args.distributed_dp or None)], "--secure-aggregation")  # fmt: skip
    check_number("--secagg-threshold", args.secagg_threshold, low=2, high=args.sites, integer=True)
    check_number("--secagg-bits", args.secagg_bits, low=8, high=32, integer=True)
    check_number("--secagg-neighbours", args.secagg_neighbours, low=2, integer=True)
    if hasattr(args, "tracking"):
        from monai_fedpriv.cli.tracking import check_tracking_flags

        check_tracking_flags(args)
    strategy_from_args(args)
