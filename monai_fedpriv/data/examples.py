"""Ready-made SYNTHETIC data sets for trying the task bundles without real data (``monai-fedpriv data --synthetic``).

``msd``: an MSD Task03_Liver-like CT task (``dataset.json``, ``imagesTr/``, ``labelsTr/``; labels background, liver,
cancer; two institutions named in the items), the layout ``bundles/liver_ct_2d`` reads. ``brats``: a BraTS
2020-like release (one folder per case, t1/t1ce/t2/flair + seg, ``name_mapping.csv`` naming two institutions), the
layout ``bundles/brain_tumour_2d_flair`` and ``bundles/brain_tumour_3d`` read. Both are the phantoms of
:mod:`monai_fedpriv.data.synthetic`: they exercise the pipeline, and say nothing about accuracy on real scans.

Example::

    monai-fedpriv data --synthetic msd --output data/Task03_Synthetic
    monai-fedpriv simulate bundles/liver_ct_2d --data data/Task03_Synthetic --sites 2 --rounds 2 --output runs/try
"""

from __future__ import annotations

from pathlib import Path

from monai_fedpriv.data.synthetic import write_brats_folder, write_msd_task

__all__ = ["EXAMPLE_KINDS", "write_example_dataset"]

#: the synthetic data sets, with what each is for
EXAMPLE_KINDS = {
    "msd": "an MSD Task03_Liver-like CT task (bundles/liver_ct_2d)",
    "brats": "a BraTS 2020-like release (bundles/brain_tumour_2d_flair, bundles/brain_tumour_3d)",
}

_LIVER_LABELS = {0: "background", 1: "liver", 2: "cancer"}


def write_example_dataset(kind: str, output: Path | None, cases: int | None = None, seed: int | None = None) -> Path:
    """Write the synthetic data set ``kind`` (``"msd"`` or ``"brats"``) into ``output`` (a new or empty folder).

    Args:
        kind: which data set (:data:`EXAMPLE_KINDS`).
        output: the folder to write; must not hold files already.
        cases: number of cases (default 12, at least 4: two sites with a training and a validation patient each).
        seed: seed of every draw (default 0).

    Returns:
        the folder written.

    Raises:
        OptionError: a missing or used ``--output``, or a bad ``--cases`` / ``--seed`` (naming the flag).
    """
    from monai_fedpriv.cli.options import MAX_SEED, OptionError, check_number, check_output_folder

    if kind not in EXAMPLE_KINDS:
        raise OptionError(f"--synthetic {kind!r}: choose one of {', '.join(EXAMPLE_KINDS)}.")
    if output is None:
        raise OptionError("--synthetic needs --output DIR (a new or empty folder).")
    check_output_folder(output)
    if output.is_dir() and any(output.iterdir()):
        raise OptionError(f"--output {output} already holds files; choose a new or empty folder.")
    cases = 12 if cases is None else cases
    seed = 0 if seed is None else seed
    check_number("--cases", cases, low=4, integer=True)
    check_number("--seed", seed, low=0, high=MAX_SEED, integer=True)
    if kind == "msd":
        return write_msd_task(output, cases, shape=(96, 96, 24), modalities=("CT",), labels=_LIVER_LABELS,
                              spacing=(1.5, 1.5, 3.0), seed=seed, institutions=("hospital_a", "hospital_b"),
                              name="SyntheticLiver")  # fmt: skip
    return write_brats_folder(output, cases, shape=(64, 64, 48), seed=seed, institutions=("CBICA", "TCIA_08"))
