"""From run flags to a planned federated run: the bundle with its privacy and data overrides, the sites' data, and
the run's one settings tree (:class:`~monai_fedpriv.fl.nvflare.settings.JobSettings`: rounds, local work, seed,
momentum, the strategy and its settings, screening, faults, noise source, the sites' data lists), built and
validated here once. ``simulate`` runs it in-process; ``export-nvflare`` writes the same tree into an NVIDIA FLARE
job. Every flag is checked before any data is read."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_fedpriv.bundle.loader import BundleSpec, parser_get
from monai_fedpriv.cli.options import OptionError, check_privacy_config, privacy_files_and_overrides
from monai_fedpriv.cli.overrides import check_overrides, parse_overrides
from monai_fedpriv.cli.run_flags import check_run_flags
from monai_fedpriv.cli.strategy import strategy_from_args
from monai_fedpriv.experiments.federated import SiteSplit
from monai_fedpriv.fl.nvflare.settings import JobSettings
from monai_fedpriv.fl.server.screening import ScreenSettings
from monai_fedpriv.fl.simulator import Fault, LocalWork

__all__ = ["RunPlan", "check_items_per_patient", "plan_run", "secure_settings"]


@dataclass
class RunPlan:
    """What a federated run needs, decided from the flags (and the data, with ``--data``): the bundle, the sites'
    split and the run's settings tree; everything else is read from the tree."""

    bundle: BundleSpec
    split: SiteSplit
    settings: JobSettings
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def local_work(self) -> LocalWork:
        s = self.settings
        return LocalWork(epochs=None, steps=s.local_steps) if s.local_steps else LocalWork(epochs=s.local_epochs or 1)

    @property
    def screen(self) -> ScreenSettings:
        return ScreenSettings(**self.settings.screen)

    @property
    def faults(self) -> list[Fault]:
        from monai_fedpriv.fl.simulator import parse_fault

        return [parse_fault(f) for f in self.settings.faults]

    def build_strategy(self) -> Any:
        from monai_fedpriv.fl.strategies import build_strategy

        return build_strategy(**self.settings.strategy)


def plan_run(args: argparse.Namespace, log: Callable[[str], None] = print) -> RunPlan:
    """Check the run flags and decide the run (see the module docstring)."""
    from monai_fedpriv.bundle.loader import load_bundle
    from monai_fedpriv.data.splits import check_patients_at_one_site
    from monai_fedpriv.experiments import bundle_datalist, split_sites
    from monai_fedpriv.fl.simulator import FaultInjector, parse_fault

    check_run_flags(args)
    try:  # library checks of the flag values raise ValueError naming the value: report them as the flag's error
        faults = [parse_fault(f) for f in args.inject_fault]
        FaultInjector(faults).check_sites([f"site-{k + 1}" for k in range(args.sites)])
        if not args.secure_aggregation and any(f.kind in ("drop-before-send", "drop-after-send") for f in faults):
            raise OptionError("--inject-fault drop-before-send / drop-after-send: these are stages of secure "
                              "aggregation; add --secure-aggregation.")  # fmt: skip
        late = [str(f) for f in faults if f.round > args.rounds]
        if late:
            raise OptionError(f"--inject-fault {', '.join(late)}: beyond --rounds {args.rounds}, it would never "
                              f"happen.")  # fmt: skip
        strategy_name, strategy_options = strategy_from_args(args)
        screen = ScreenSettings(max_update_norm=args.max_update_norm, norm_factor=args.norm_factor)
    except ValueError as exc:
        raise OptionError(str(exc)) from exc
    secure = secure_settings(args, strategy_name)  # before any privacy object or data: what cannot run at all
    local_work = (
        LocalWork(epochs=None, steps=args.local_steps) if args.local_steps else LocalWork(epochs=args.local_epochs or 1)
    )
    config_files, overrides = privacy_files_and_overrides(args, list(args.config_files))
    overrides.update(check_overrides(BundleSpec(args.bundle_dir, tuple(config_files)), parse_overrides(args.override)))
    parser = load_bundle(BundleSpec(args.bundle_dir, tuple(config_files), overrides))  # every id the run needs
    privacy = check_privacy_config(BundleSpec(args.bundle_dir, tuple(config_files), overrides), args.momentum)
    if privacy:
        log(f"privacy: {privacy}")
    own = None
    if args.data is None:  # a task bundle pointed at its data by --override dataset_dir=DIR: the same as --data DIR
        if parser_get(parser, "adapt_target") is not None and parser_get(parser, "dataset_dir"):
            args.data = Path(str(parser_get(parser, "dataset_dir")))
    if args.data is not None:  # the data first: its description decides the bundle's channels and transforms
        from monai_fedpriv.experiments.own_data import adapt_bundle, load_own_data

        own = load_own_data(args.data, args.layout, args.institutions)
        if args.privacy != "none" and args.privacy_unit is None and own.info.spatial_dims == 3:
            overrides["dp_privacy_unit"] = "patient"
            log("privacy unit: patient (3D volumes: each patient's slices are sampled and clipped together)")
        adapted, target = adapt_bundle(BundleSpec(args.bundle_dir, tuple(config_files), overrides), own,
                                       privacy=args.privacy != "none")  # fmt: skip
        overrides = {**adapted, **overrides}
        log(f"data: {own.info.name} ({own.info.layout}, {own.info.n_cases} cases, modalities "
            f"{list(own.info.modalities)}, labels {own.info.labels}); network {target.spatial_dims}D on "
            f"{own.info.spatial_dims}D images, patch {list(target.patch_size)}")  # fmt: skip
    bundle = BundleSpec(args.bundle_dir, tuple(config_files), overrides)
    extra: dict[str, Any] = {}
    if own is not None:
        from monai_fedpriv.experiments.own_data import split_own_data

        val_fraction = 0.2 if args.val_fraction is None else args.val_fraction
        split = split_own_data(own, args.sites, args.partition, val_fraction, args.seed)
        extra["data"] = own.summary(split)
    else:
        log(f"loading data list of {args.bundle_dir} ...")
        split = split_sites(bundle_datalist(bundle), args.sites, args.partition or "institution", args.seed)
    log(f"partition {split.scheme}: train {split.sizes}, validation {split.describe()['val_sizes']}, mean KS "
        f"{split.mean_ks}")  # fmt: skip
    unit = overrides.get("dp_privacy_unit", privacy.get("privacy_unit"))
    if privacy and unit == "patient":
        check_patients_at_one_site(split.train)  # before an exported job sends a split that under-counts a patient
    if args.items_per_patient is not None:
        check_items_per_patient(args.items_per_patient, unit, split, own is not None and own.info.spatial_dims == 3)
    strategy = {"name": strategy_name, **strategy_options}
    from monai_fedpriv.fl.strategies import build_strategy

    method = build_strategy(**strategy)
    if (problem := method.work_problem(local_work.steps, args.min_sites)) is not None:
        raise OptionError(problem)
    private = args.privacy != "none" or getattr(args, "share", "none") != "none"
    problem = method.exposure_problem(bool(getattr(args, "latents_unprotected", False)),
                                      getattr(args, "latent_noise_multiplier", None) is not None, private)
    if problem is not None:
        raise OptionError(problem)
    train = method.site_data(split.train, args.seed)  # FedAvg+Share: private cases + pool
    if args.rounds < method.min_rounds:  # CWT+Replay's count its sites (site_data)
        raise OptionError(f"--rounds {args.rounds}: --strategy {method.name} needs at least {method.min_rounds} "
                          f"rounds.")  # fmt: skip
    job = {"wait_after_min": args.wait_after_min} if getattr(args, "wait_after_min", None) is not None else {}
    settings = JobSettings(
        name=getattr(args, "name", None) or Path(args.output).name, bundle=Path(args.bundle_dir).resolve().name,
        config_files=list(bundle.config_files), overrides=dict(bundle.overrides), rounds=args.rounds,
        sites=list(split.train), local_epochs=local_work.epochs, local_steps=local_work.steps, seed=args.seed,
        momentum=args.momentum, strategy=strategy, screen=screen.to_dict(), min_sites=args.min_sites,
        round_timeout=args.round_timeout, secure_noise=args.noise == "secure",
        latents_unprotected=bool(getattr(args, "latents_unprotected", False)),
        data={s: {"train": train[s], "val": split.val.get(s, [])} for s in train}, faults=list(args.inject_fault),
        partition=split.describe(), data_summary=extra.get("data"), resume=args.resume,
        secure_aggregation=None if secure is None else secure.describe(), **job,
    )  # fmt: skip
    return RunPlan(bundle, split, settings, extra)


def secure_settings(args: argparse.Namespace, strategy: str) -> Any:
    """``--secure-aggregation`` and its flags as a :class:`~monai_fedpriv.fl.secure.SecureAggregation`, refused in
    one line when the run cannot aggregate securely (``None`` without the flag)."""
    if not args.secure_aggregation:
        return None
    from monai_fedpriv.fl.secure import SecureAggregation

    try:
        secure = SecureAggregation(
            clip=args.max_update_norm, threshold=args.secagg_threshold, bits=args.secagg_bits,
            neighbours=args.secagg_neighbours, distributed_dp=args.distributed_dp,
            noise_multiplier=args.noise_multiplier if args.distributed_dp else 0.0,
        )  # fmt: skip
        secure.check_run(args.sites, strategy, args.min_sites, sparse=getattr(args, "share", "none") in ("svt",
                         "percentile"), moments=args.momentum == "aggregate")  # fmt: skip
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    return secure


def check_items_per_patient(value: int, unit: str | None, split: SiteSplit, volumes: bool) -> None:
    """Refuse ``--items-per-patient`` where it cannot change anything: without the patient unit, or above the
    number of training items any patient has (3D volumes: one item, the volume, per patient)."""
    if unit != "patient":
        raise OptionError(f"--items-per-patient {value}: it is used by the patient privacy unit only (the unit here "
                          f"is {unit!r}); add --privacy-unit patient or drop the flag.")  # fmt: skip
    counts: dict[str, int] = {}
    for cases in split.train.values():
        for case in cases:
            patient = str(case.get("patient", case.get("image")))
            counts[patient] = counts.get(patient, 0) + 1
    most = max(counts.values(), default=0)
    if value > most:
        why = (" (each patient is one 3D volume, and the network trains on one sampled patch or slice of it per "
               "visit)" if volumes else "")  # fmt: skip
        raise OptionError(
            f"--items-per-patient {value}: no patient has more than {most} training item(s){why}, so an included "
            f"patient always contributes all of them and the flag would change nothing; drop it."
        )
