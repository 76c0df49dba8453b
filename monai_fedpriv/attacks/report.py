"""Markdown tables of attack results, in the shape of the seeds' results (seed 000, Fig. 3; seed 004, Table 2).

Pure formatting over the JSON records written by :func:`monai_fedpriv.attacks.cli.attack_image` and the latent
inversion rows of ``scripts/reproduce_attack_table.py``; nothing here runs an attack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["attack_table", "latent_table", "noise_break", "mean"]


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not ``None`` (``None`` when there are none)."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def attack_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (case, victim): attack PSNR/SSIM/NCC, both baselines, epsilon, verdict.

    Args:
        rows: records with ``case``, ``victim`` and the keys of ``attack.json``.
    """
    head = (
        "| case | victim | eps | PSNR | SSIM | NCC | const PSNR | const SSIM | mask PSNR | mask SSIM | verdict |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        b = r["baselines"]
        eps = "inf" if r.get("epsilon") is None else f"{r['epsilon']:.2f}"
        mask = b.get("mask", {})
        lines.append(
            f"| {r['case']} | {r['victim']} | {eps} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['ncc']:.3f} | "
            f"{b['constant']['psnr']:.2f} | {b['constant']['ssim']:.3f} | {_fmt(mask.get('psnr'))} | "
            f"{_fmt(mask.get('ssim'), 3)} | {r['verdict']} |"
        )
    return "\n".join(lines)


def latent_table(rows: Sequence[dict[str, Any]]) -> str:
    """Latent inversion scores per encoder depth (mean over victims), the shape of seed 004, Table 2."""
    depths = sorted({int(r["depth"]) for r in rows})
    lines = [
        "| encoder | latent shape | PSNR | SSIM | NCC | victims |",
        "|---|---|---|---|---|---|",
    ]
    for d in depths:
        sel = [r for r in rows if int(r["depth"]) == d]
        lines.append(
            f"| UNet blocks 1..{d} | {'x'.join(str(s) for s in sel[0]['latent_shape'])} | "
            f"{_fmt(mean([r['psnr'] for r in sel]))} | {_fmt(mean([r['ssim'] for r in sel]), 3)} | "
            f"{_fmt(mean([r['ncc'] for r in sel]), 3)} | {len(sel)} |"
        )
    return "\n".join(lines)


def noise_break(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Smallest noise multiplier of a sweep at which the attack stops beating each baseline.

    "Beating" is the criterion of :func:`~monai_fedpriv.attacks.scores.verdict`: higher PSNR *and* higher SSIM than
    the baseline, so this summary and the verdict column of the table always agree.

    Args:
        rows: sweep records (one victim) with ``noise_multiplier``, ``psnr``, ``ssim`` and ``baselines``.

    Returns:
        ``{"mask": sigma or None, "constant": sigma or None}``; ``None`` = the attack beat that baseline at every
        noise level of the sweep.
    """
    out: dict[str, float | None] = {"mask": None, "constant": None}
    for r in sorted(rows, key=lambda r: r["noise_multiplier"]):
        for name in out:
            base = r["baselines"].get(name)
            beaten = base is not None and r["psnr"] > base["psnr"] and r["ssim"] > base["ssim"]
            if out[name] is None and base is not None and not beaten:
                out[name] = float(r["noise_multiplier"])
    return out
