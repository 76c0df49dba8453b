"""Turn ``simulate``'s privacy, sharing and server flags into bundle config files, overrides and server settings, and
check every value before any data is loaded (one ``error:`` line naming the flag, exit code 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle, parser_get
from monai_fedpriv.cli.overrides import parse_overrides
from monai_fedpriv.errors import PrivacyConfigError
from monai_fedpriv.experiments.sharing_study import ShareSettings

__all__ = [
    "MAX_SEED",
    "OptionError",
    "check_device",
    "check_output_folder",
    "check_number",
    "check_share_flags",
    "refuse_given",
    "check_privacy_config",
    "parse_overrides",
    "privacy_files_and_overrides",
    "share_settings",
]


class OptionError(ValueError):
    """A command-line flag has a bad value (the message names the flag)."""


def check_number(
    flag: str,
    value: float | int | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Refuse a non-finite or out-of-range flag value with a message naming the flag and the range."""
    if value is None:
        return
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise OptionError(f"{flag} must be an integer, got {value!r}.")
    if not math.isfinite(float(value)):
        raise OptionError(f"{flag} must be a finite number, got {value!r}.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {_bound(low)}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {_bound(high)}"
        raise OptionError(f"{flag} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}.")


def _bound(value: float) -> str:
    """A range bound as written: whole numbers in full (``4294967295``), others short (``0.001``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


#: the largest run seed (NumPy's global generator takes seeds below 2**32)
MAX_SEED = 2**32 - 1


def check_output_folder(path: Path, flag: str = "--output") -> None:
    """Refuse an output folder that is a file, or lies under one (one message naming the flag and the file)."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is" if folder == path else f"lies under {folder}, which is"
                raise OptionError(f"{flag} {path} {where} a file, not a folder; name a folder.")
            return


def check_device(name: str, flag: str = "--device") -> None:
    """Refuse a torch device this machine does not have (``cuda:7`` on one GPU, ``cuda`` without CUDA, a typo)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise OptionError(f"{flag} {name!r} is not a torch device (e.g. cpu, cuda, cuda:0).") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"{flag} {name}: this machine has no CUDA device PyTorch can use; use --device cpu.")
        if device.index is not None and device.index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise OptionError(f"{flag} {name}: this machine has {count} CUDA device(s) ({have}).")
        return
    try:
        torch.zeros(1, device=device)
    except Exception as exc:  # noqa: BLE001 - any backend's refusal is the flag's error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptionError(f"{flag} {name}: PyTorch cannot use this device here ({first}).") from None


def refuse_given(flags: Sequence[tuple[str, Any]], needs: str) -> None:
    """Refuse the flags of ``(flag, value)`` that were given (value not ``None``) because they need ``needs``."""
    given = [flag for flag, value in flags if value is not None]
    if given:
        raise OptionError(f"{', '.join(given)} need {needs}.")


SHARE_OPTIONS = {
    "percentile": ("share_fraction", "share_clip"),
    "svt": ("share_fraction", "share_clip", "svt_epsilon", "svt_epsilon3", "svt_threshold"),
    "gaussian": ("gaussian_clip", "gaussian_noise"),
}


def check_share_flags(args: argparse.Namespace) -> None:
    """Refuse share flags that ``--share`` does not use, and bad values, naming the flag (``simulate``,
    ``export-nvflare`` and ``attack``; flags a command does not have count as not given)."""
    given = {name for names in SHARE_OPTIONS.values() for name in names if getattr(args, name, None) is not None}
    if args.share == "none":
        refuse_given([("--" + n.replace("_", "-"), True) for n in sorted(given)], "--share")
        return
    unused = given - set(SHARE_OPTIONS[args.share])
    if unused:
        names = ", ".join("--" + n.replace("_", "-") for n in sorted(unused))
        raise OptionError(f"{names}: not used by --share {args.share}.")
    check_number("--share-fraction", getattr(args, "share_fraction", None), low=0, high=1, low_open=True)
    check_number("--share-clip", getattr(args, "share_clip", None), low=0, low_open=True)
    check_number("--svt-epsilon", getattr(args, "svt_epsilon", None), low=0, low_open=True)
    check_number("--svt-epsilon3", getattr(args, "svt_epsilon3", None), low=0, low_open=True)
    check_number("--svt-threshold", getattr(args, "svt_threshold", None), low=0)
    check_number("--gaussian-clip", getattr(args, "gaussian_clip", None), low=0, low_open=True)
    check_number("--gaussian-noise", getattr(args, "gaussian_noise", None), low=0, low_open=True)


def share_settings(args: argparse.Namespace) -> ShareSettings | None:
    """The ``--share`` filter and its settings, or ``None``; flags that the method does not use are refused."""
    check_share_flags(args)
    if args.share == "none":
        return None
    if args.share == "gaussian":
        if args.gaussian_clip is None or args.gaussian_noise is None:
            raise OptionError("--share gaussian needs --gaussian-clip and --gaussian-noise.")
        return ShareSettings("gaussian", clip_norm=args.gaussian_clip, noise_multiplier=args.gaussian_noise)
    fraction = 0.1 if args.share_fraction is None else args.share_fraction
    if args.share == "percentile":
        return ShareSettings("percentile", fraction=fraction, clip=args.share_clip)
    clip = 1e-3 if args.share_clip is None else args.share_clip
    return ShareSettings(
        "svt",
        fraction=fraction,
        clip=clip,
        epsilon_select=1.0 if args.svt_epsilon is None else args.svt_epsilon,
        epsilon3=1.0 if args.svt_epsilon3 is None else args.svt_epsilon3,
        threshold=clip / 2 if args.svt_threshold is None else args.svt_threshold,
    )


def latent_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The overrides of the latent mechanism (``latents.json``) its flags ask for, checked; ``{}`` without it."""
    noise, clip = getattr(args, "latent_noise_multiplier", None), getattr(args, "latent_clip", None)
    unprotected = bool(getattr(args, "latents_unprotected", False))
    check_number("--latent-noise-multiplier", noise, low=0, low_open=True)
    check_number("--latent-clip", clip, low=0, low_open=True)
    if noise is None:
        refuse_given([("--latent-clip", clip)], "--latent-noise-multiplier")
        return {}
    if unprotected:
        raise OptionError("--latents-unprotected and --latent-noise-multiplier exclude each other: choose one.")
    if getattr(args, "epsilon_budget", None) is None:
        raise OptionError("--latent-noise-multiplier needs --epsilon-budget: the upload is one release in the site's "
                          "budget.")  # fmt: skip
    return {"latent_noise_multiplier": noise, "latent_clip_norm": 1.0 if clip is None else clip}


def privacy_files_and_overrides(args: argparse.Namespace, config_files: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Config files and overrides for ``--privacy``, ``--share`` and the budget flags.

    ``budget.json`` (the site's one budget) is merged whenever a DP mechanism is used, before ``dp.json`` (DP-SGD
    with the Table 1 regime) and the share filter's file.
    """
    check_number("--noise-multiplier", args.noise_multiplier, low=0, low_open=True)
    check_number("--max-grad-norm", args.max_grad_norm, low=0, low_open=True)
    check_number("--delta", args.delta, low=0, high=1, low_open=True, high_open=True)
    check_number("--epsilon-budget", args.epsilon_budget, low=0, low_open=True)
    check_number("--items-per-patient", args.items_per_patient, low=1, integer=True)
    share = share_settings(args)
    dp = args.privacy != "none"
    latent = latent_overrides(args)
    ddp = bool(getattr(args, "distributed_dp", False))
    budgeted = dp or (share is not None and share.needs_budget) or bool(latent) or ddp
    files, overrides = list(config_files), {}
    if ddp and args.privacy == "custom":
        raise OptionError("--distributed-dp takes --noise-multiplier for the sum's noise; with --privacy custom it "
                          "would be DP-SGD's too: give DP-SGD a regime (--privacy low|medium|high).")  # fmt: skip
    if ddp and args.noise_multiplier is None:
        raise OptionError("--distributed-dp needs --noise-multiplier S: the sum's noise std over --max-update-norm.")
    if not dp:
        refuse_given([("--noise-multiplier", None if ddp else args.noise_multiplier),
                      ("--max-grad-norm", args.max_grad_norm), ("--privacy-unit", args.privacy_unit),
                      ("--items-per-patient", args.items_per_patient)], "--privacy")  # fmt: skip
    if not budgeted:
        refuse_given([("--delta", args.delta), ("--epsilon-budget", args.epsilon_budget),
                      ("--budget-policy", args.budget_policy), ("--accountant", args.accountant)],
                     "--privacy, --share svt|gaussian or --distributed-dp")  # fmt: skip
    if args.privacy == "custom" and (args.noise_multiplier is None or args.max_grad_norm is None):
        raise OptionError("--privacy custom needs --noise-multiplier and --max-grad-norm.")
    if budgeted and "budget.json" not in files:
        files.append("budget.json")
    if dp:
        dp_noise = None if ddp else args.noise_multiplier  # with --distributed-dp the flag is the sum's noise
        custom = {k: v for k, v in (("noise_multiplier", dp_noise), ("max_grad_norm", args.max_grad_norm),
                                    ("delta", args.delta)) if v is not None}  # fmt: skip
        if "dp.json" not in files:
            files.append("dp.json")
        overrides["dp_regime_def"] = {
            "_target_": "monai_fedpriv.privacy.get_regime",
            "name": args.privacy,
            "setting": "federated" if args.sites > 1 else "local",
            **custom,
        }
        if args.privacy_unit is not None:
            overrides["dp_privacy_unit"] = args.privacy_unit
        if args.items_per_patient is not None:
            overrides["dp_items_per_patient"] = args.items_per_patient
    if share is not None:
        if share.config_file not in files:
            files.append(share.config_file)
        overrides.update(share.overrides())
    if latent:
        files.append("latents.json")
        overrides.update(latent)
    if args.epsilon_budget is not None:
        overrides["privacy_epsilon_budget"] = args.epsilon_budget
    if args.delta is not None:
        overrides["privacy_delta"] = args.delta
    if args.budget_policy is not None:
        overrides["privacy_policy"] = args.budget_policy
    if args.accountant is not None:
        overrides["privacy_accountant"] = args.accountant
    return files, overrides


def check_privacy_config(bundle: BundleSpec, momentum: str = "restart") -> dict[str, Any]:
    """Build the site's privacy objects that need no data (budget, DP-SGD settings, share filters) once, so a bad or
    unsupported setting fails here, before any data is loaded, with the error of the object that refuses it; and
    check the coverage rule of the filter chain against what the momentum policy sends.

    Returns:
        a summary of the privacy settings (for the progress output), empty without privacy.
    """
    from monai_fedpriv.fl.momentum import sent_fields
    from monai_fedpriv.privacy.dp_sgd import DPSGD, DPSettings
    from monai_fedpriv.privacy.filters import FilterChain

    parser = load_bundle(bundle, required=())
    sent = sent_fields(momentum)
    if parser_get(parser, "privacy_budget") is None:
        if parser_get(parser, "fed_share_filters"):
            FilterChain(parser.get_parsed_content("fed_share_filters")).check_coverage(sent)
        return {}
    budget = parser.get_parsed_content("privacy_budget")
    summary: dict[str, Any] = {"budget": budget.limit, "delta": budget.delta, "accountant": budget.accountant}
    if parser_get(parser, "dp") is not None:
        settings = DPSettings(
            parser.get_parsed_content("dp_noise_multiplier"),
            parser.get_parsed_content("dp_max_grad_norm"),
            True,
            parser.get_parsed_content("dp_grad_sample_mode"),
            parser.get_parsed_content("dp_max_physical_batch_size"),
            parser.get_parsed_content("dp_privacy_unit"),
            parser.get_parsed_content("dp_items_per_patient"),
        )
        summary.update(noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
                       privacy_unit=settings.privacy_unit)  # fmt: skip
    filters = parser.get_parsed_content("fed_share_filters") if parser_get(parser, "fed_share_filters") else []
    summary["share_filters"] = [type(f).__name__ for f in filters]
    if "privacy_unit" not in summary and budget.reserved:  # an update filter alone: one release per site update
        from monai_fedpriv.handlers.privacy_budget import UPDATE_UNIT

        summary["privacy_unit"] = UPDATE_UNIT["privacy_unit"]
    dp_covers = [_Declares(DPSGD.covers)] if parser_get(parser, "dp") is not None else []
    FilterChain([*dp_covers, *filters]).check_coverage(sent)
    if budget.limit is None and budget.reserved:
        raise PrivacyConfigError("an update filter with a DP guarantee needs --epsilon-budget.")
    return summary


class _Declares:
    """Stands for a filter that needs data to be built (DP-SGD) in the coverage check: only its ``covers``."""

    def __init__(self, covers: frozenset[str]) -> None:
        self.covers = covers

    def __call__(self, update: Any) -> Any:  # pragma: no cover - never applied
        raise RuntimeError("a coverage stand-in is never applied to an update.")
