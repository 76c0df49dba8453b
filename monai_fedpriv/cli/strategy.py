"""``--strategy NAME`` (``--aggregator`` is its old name) and every strategy setting's flag, generated from the
settings dataclasses of the strategy registry (:mod:`monai_fedpriv.fl.strategies.settings`): a setting's flag, help,
default and range are defined once, there."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from typing import Any

from monai_fedpriv.cli.options import OptionError

__all__ = ["add_strategy_flags", "strategy_from_args"]


def _flag_fields() -> dict[str, Any]:
    """``{flag: field}`` over every registered strategy (a flag shared by several strategies means the same)."""
    from monai_fedpriv.fl.strategies import REGISTRY

    out: dict[str, Any] = {}
    for _, settings_type in REGISTRY.values():
        for f in fields(settings_type):
            out.setdefault(f.metadata["flag"], f)
    return out


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_strategy_flags(group: argparse._ArgumentGroup) -> None:
    """Add ``--strategy`` (alias ``--aggregator``) and one flag per strategy setting to ``group``."""
    from monai_fedpriv.fl.strategies import STRATEGIES

    group.add_argument(
        "--strategy", "--aggregator", dest="strategy", choices=STRATEGIES, default="fedavg",
        help="fedavg (Li et al. 2019), fedavgm (server momentum), fedprox (Li et al. 2020), cwt (cyclic weight "
        "transfer), fedavg-share (a public pool, Zhao et al. 2018), splitnn (split learning, Vepakomma et al. 2018), "
        "fedreplay (latents trained at the server, seed 004), cwt-replay (cyclic transfer with generative replay, "
        "seed 004), median or trimmed-mean (robust, Yin et al. 2018); default fedavg",
    )  # fmt: skip
    for flag, f in _flag_fields().items():
        kind = str if f.metadata["choices"] or f.metadata.get("text") else int if f.type in ("int", int) else float
        group.add_argument(flag, dest=_dest(flag), type=kind, choices=f.metadata["choices"], default=None,
                           help=f.metadata["help"])  # fmt: skip


def strategy_from_args(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``(name, settings)`` of the strategy the flags ask for, validated: a setting flag the strategy does not use,
    or a value out of range, is one :class:`OptionError` naming the flag."""
    from monai_fedpriv.fl.strategies import REGISTRY, strategy_settings

    name = args.strategy
    own = {f.metadata["flag"]: f.name for f in fields(REGISTRY[name][1])}
    options: dict[str, Any] = {}
    for flag in _flag_fields():
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        if flag not in own:
            users = [n for n, (_, st) in REGISTRY.items() if flag in {f.metadata["flag"] for f in fields(st)}]
            raise OptionError(f"{flag} is used by --strategy {' / '.join(users)} only (this run's is {name}).")
        options[own[flag]] = value
    try:
        return name, asdict(strategy_settings(name, **options))
    except ValueError as exc:
        raise OptionError(str(exc)) from exc
