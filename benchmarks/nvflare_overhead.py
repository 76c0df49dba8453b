"""Seconds beyond compute of one tiny federated job run three ways, side by side in one run:

* ``in-process``: ``monai_fedpriv``'s in-process simulator (``run_experiment``, called in this process);
* ``project-nvflare``: the job written by ``monai-fedpriv export-nvflare`` run in NVFlare's simulator
  (``monai-fedpriv run-nvflare --simulator``: every site's bundle trainer in its own process);
* ``nvflare-recipe``: NVFlare's own ``FedAvgRecipe`` with a plain Client API script that trains the same network on
  the same data in an external process per site, in NVFlare's ``SimEnv``.

The job: 3 sites, 3 rounds, 1 local step per round, the default bundle shrunk to 32x32 images and a 2-level U-Net,
each site scoring the global model on its validation cases every round. "Compute" is the time the same work takes
in one plain loop here (build each site's network and loader, then per round and site one training step and one
validation pass); "beyond compute" is a method's wall time minus that. The NVFlare methods include starting Python
processes and importing torch and MONAI in them, which is most of their overhead.

Usage:
    python benchmarks/nvflare_overhead.py                  # one repetition of each, table on stdout
    python benchmarks/nvflare_overhead.py --repeats 3 --json runs/bench/nvflare_overhead.json

Targets (brief): the project's NVFlare job within 1.1x of NVFlare's own recipe, the in-process simulator under 5 s
beyond compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brain_tissue_2d"
SITES, ROUNDS = 3, 3
TINY = {"network_def#channels": [8, 16], "network_def#strides": [2], "batch_size": 4}

PLAIN_CLIENT = '''"""A plain Client API trainer: the bundle's network, loss, optimiser and data; 1 step a round."""
import json, sys
import torch
import nvflare.client as flare
from monai.bundle import ConfigParser
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

flare.init()
site = flare.get_site_name()
lists = json.load(open(sys.argv[1]))[site]
parser = ConfigParser()
parser.read_config(json.load(open(sys.argv[2])))
parser["train#dataset#data"] = lists["train"]
parser["validate#dataset#data"] = lists["val"]
network = parser.get_parsed_content("network")
loss_fn = parser.get_parsed_content("loss")
optimizer = parser.get_parsed_content("optimizer")
loader = parser.get_parsed_content("train#dataloader")
val_loader = parser.get_parsed_content("validate#dataloader")
inferer = parser.get_parsed_content("validate#inferer")
stream = iter(loader)

def evaluate():
    network.eval()
    with torch.no_grad():
        for batch in val_loader:
            inferer(batch["image"], network)
    network.train()

while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    network.load_state_dict({k: torch.as_tensor(v) for k, v in model.params.items()})
    evaluate()
    try:
        batch = next(stream)
    except StopIteration:
        stream = iter(loader)
        batch = next(stream)
    optimizer.zero_grad()
    loss_fn(network(batch["image"]), batch["label"]).backward()
    optimizer.step()
    evaluate()
    params = {k: v.cpu().numpy() for k, v in network.state_dict().items()}
    flare.send(FLModel(params_type=ParamsType.FULL, params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
'''


def _run(cmd: list[str], **kwargs: Any) -> None:
    """Run ``cmd``; on failure raise with the end of its output."""
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")


def _setup(work: Path) -> tuple[Path, dict[str, Any]]:
    """Tiny data, a tiny bundle copy, and the per-site split (the same for every method)."""
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.data.brain_tissue import build_brain_tissue_2d
    from monai_fedpriv.experiments import bundle_datalist, split_sites

    data = build_brain_tissue_2d(work / "data", n_sites=SITES, cases_per_site=8, val_per_site=2, image_size=32, seed=3)
    bundle = work / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for name in ("train.json", "metadata.json"):
        (bundle / "configs" / name).write_text((BUNDLE / "configs" / name).read_text())
    (bundle / "configs" / "tiny.json").write_text(json.dumps({**TINY, "dataset_dir": str(data)}))
    spec = BundleSpec(bundle, ("train.json", "tiny.json"))
    split = split_sites(bundle_datalist(spec), SITES, "iid", 0)
    return bundle, {"spec": spec, "split": split}


def _compute_seconds(ctx: dict[str, Any]) -> float:
    """The job's work in one plain loop: per round and site, one training step and one validation pass."""
    import torch

    from monai_fedpriv.bundle.loader import load_bundle

    sites = []
    for name, train in ctx["split"].train.items():
        lists = {"train#dataset#data": train, "validate#dataset#data": ctx["split"].val[name]}
        parser = load_bundle(ctx["spec"], lists)
        sites.append([parser.get_parsed_content(k) for k in ("network", "loss", "optimizer", "train#dataloader",
                                                             "validate#dataloader", "validate#inferer")])  # fmt: skip
    t0 = time.perf_counter()
    for _ in range(ROUNDS):
        for network, loss_fn, optimizer, loader, val_loader, inferer in sites:
            batch = next(iter(loader))
            optimizer.zero_grad()
            loss_fn(network(batch["image"]), batch["label"]).backward()
            optimizer.step()
            network.eval()
            with torch.no_grad():
                for item in val_loader:
                    inferer(item["image"], network)
            network.train()
    return time.perf_counter() - t0


def _in_process(ctx: dict[str, Any], out: Path) -> float:
    from monai_fedpriv.experiments import run_experiment
    from monai_fedpriv.fl.simulator import LocalWork

    t0 = time.perf_counter()
    run_experiment(ctx["spec"], ctx["split"], out, ROUNDS, LocalWork(epochs=None, steps=1))
    return time.perf_counter() - t0


def _project_nvflare(bundle: Path, work: Path) -> float:
    cli = str(Path(sys.executable).parent / "monai-fedpriv")
    flags = ["--sites", str(SITES), "--rounds", str(ROUNDS), "--local-steps", "1", "--partition", "iid",
             "--config-files", "train.json", "tiny.json"]  # fmt: skip
    _run([cli, "export-nvflare", str(bundle), *flags, "--output", str(work / "job")])
    t0 = time.perf_counter()
    _run([cli, "run-nvflare", str(work / "job"), "--simulator", "--output", str(work / "run"), "--no-report"])
    return time.perf_counter() - t0


def _recipe(ctx: dict[str, Any], work: Path) -> float:
    from monai_fedpriv.bundle.loader import load_bundle

    work.mkdir(parents=True, exist_ok=True)
    config = load_bundle(ctx["spec"]).config  # the merged bundle config the plain script parses itself
    (work / "bundle.json").write_text(json.dumps(config))
    lists = {s: {"train": ctx["split"].train[s], "val": ctx["split"].val[s]} for s in ctx["split"].train}
    (work / "lists.json").write_text(json.dumps(lists))
    (work / "plain_client.py").write_text(PLAIN_CLIENT)
    driver = f'''
import os, sys
os.chdir({str(work)!r})
from monai.bundle import ConfigParser
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe.sim_env import SimEnv
parser = ConfigParser(); parser.read_config({str(work / "bundle.json")!r})
args = {{k: parser.get_parsed_content("network_def#" + k) for k in parser["network_def"] if not k.startswith("_")}}
model = {{"class_path": "monai.networks.nets.UNet", "args": args}}
recipe = FedAvgRecipe(name="plain_fedavg", model=model, min_clients={SITES},
                      num_rounds={ROUNDS}, train_script="plain_client.py",
                      train_args="{work / "lists.json"} {work / "bundle.json"}", launch_external_process=True)
run = recipe.execute(SimEnv(num_clients={SITES}, workspace_root={str(work / "ws")!r}))
print(run.get_status())
'''
    t0 = time.perf_counter()
    (work / "driver.py").write_text(driver)
    _run([sys.executable, str(work / "driver.py")], cwd=work)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1, help="runs of each method, interleaved (median reported)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="nvflare_overhead_") as tmp:
        work = Path(tmp)
        bundle, ctx = _setup(work)
        _compute_seconds(ctx)  # warm-up (first-call costs of torch and MONAI)
        walls: dict[str, list[float]] = {"compute": [], "in-process": [], "project-nvflare": [], "nvflare-recipe": []}
        for k in range(args.repeats):
            walls["compute"].append(_compute_seconds(ctx))
            walls["in-process"].append(_in_process(ctx, work / f"inproc{k}"))
            walls["project-nvflare"].append(_project_nvflare(bundle, work / f"project{k}"))
            walls["nvflare-recipe"].append(_recipe(ctx, work / f"recipe{k}"))
    compute = statistics.median(walls["compute"])
    rows = {}
    for method in ("in-process", "project-nvflare", "nvflare-recipe"):
        wall = statistics.median(walls[method])
        rows[method] = {"wall_s": round(wall, 2), "beyond_compute_s": round(wall - compute, 2), "runs": walls[method]}
    ratio = rows["project-nvflare"]["beyond_compute_s"] / rows["nvflare-recipe"]["beyond_compute_s"]
    result = {"sites": SITES, "rounds": ROUNDS, "local_steps": 1, "compute_s": round(compute, 3), "methods": rows,
              "project_vs_recipe_beyond_compute": round(ratio, 3),
              "targets": {"project_vs_recipe_max": 1.1, "in_process_beyond_compute_max_s": 5.0}}  # fmt: skip
    print(f"compute (same work, one plain loop): {compute:.2f} s")
    print(f"{'method':<17} {'wall s':>8} {'beyond compute s':>17}")
    for method, row in rows.items():
        print(f"{method:<17} {row['wall_s']:>8.2f} {row['beyond_compute_s']:>17.2f}")
    print(f"project NVFlare job / NVFlare FedAvgRecipe (beyond compute): {ratio:.2f}x (target <= 1.1x); "
          f"in-process beyond compute {rows['in-process']['beyond_compute_s']:.2f} s (target < 5 s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
