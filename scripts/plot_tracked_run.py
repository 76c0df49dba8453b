"""Plot what an MLflow run of ``--tracking mlflow`` holds, read back through MLflow's own client.

    python scripts/plot_tracked_run.py runs/demo --output docs/figures/watch_demo.png

Left: the global model's Dice per round with the centralised baseline; middle: each site's Dice of the global model;
right: each site's epsilon when the run was private, else each site's training loss.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _series(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    return [s for s, _ in points], [v for _, v in points]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run folder with mlruns.db (simulate --tracking mlflow)")
    p.add_argument("--output", type=Path, required=True, help="the PNG to write")
    args = p.parse_args()
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    state = json.loads((args.run / "tracking.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    run = client.get_run(state["run_id"])
    keys = set(run.data.metrics)
    sites = sorted({k.split("/")[0] for k in keys if k.endswith("/global_dice")})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(*_series(client, run.info.run_id, "global/dice"), label="federated (global/dice)")
    if "baseline/centralised/dice" in keys:
        axes[0].plot(*_series(client, run.info.run_id, "baseline/centralised/dice"), "--",
                     label="centralised (baseline/centralised/dice)")  # fmt: skip
    axes[0].set(title="global Dice", xlabel="round")
    axes[0].legend(fontsize=8)
    for site in sites:
        axes[1].plot(*_series(client, run.info.run_id, f"{site}/global_dice"), label=site)
    axes[1].set(title="<site>/global_dice", xlabel="round")
    axes[1].legend(fontsize=8)
    private = [s for s in sites if f"{s}/epsilon" in keys]
    for site in private or sites:
        axes[2].plot(*_series(client, run.info.run_id, f"{site}/epsilon" if private else f"{site}/loss"), label=site)
    axes[2].set(title="<site>/epsilon" if private else "<site>/loss", xlabel="round")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"MLflow run '{run.info.run_name}', read back with MlflowClient", fontsize=9)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(args.output)


if __name__ == "__main__":
    main()
