"""Size and training speed of seed 000's networks: parameters and MACs (Table 2 shape) and seconds per epoch of the
same work locally and in the in-process federation (Table 4 shape), side by side in one run.

Size: ``count_parameters`` and exact ``count_macs`` (convolutions and linear layers; ``macs_with_norm`` adds one MAC
per norm-layer output) at the inputs of the seeds: MoNet and the three smp U-Nets at 1x256x256 with 1 output (seed
000, Table 2), SegResNet 3D at 4x128x128x128 with 3 outputs (seed 001's BraTS backbone), MONAI's UNet 2D at
3x224x224 with 1 output (seed 004's 3-slice FLAIR task). The seed's Table 2 numbers are printed next to ours: its
MoNet (390k / 6.11G) was counted by the authors' tool; the network written here from the paper has 399,009
parameters and 4.742 GMACs exactly. The smp U-Nets need segmentation-models-pytorch (and torchvision); where it is
not importable they are skipped with a line saying so.

Timing: the default bundle (``bundles/brain_tissue_2d``, copied to a temporary folder with ``network_def`` replaced
by ``monai_fedpriv.networks.build_network(NAME, 1, @num_classes)``) trains on a small brain-tissue data set built
here (3 sites, ``--cases`` per site, ``--image-size`` pixels, 3 classes; ``--data DIR`` uses a data set built
before instead, and where nilearn is missing synthetic phantoms of the same size stand in, with a line saying so):

* ``local``: ``FederatedSimulator`` with ONE site holding all ``3 x --cases`` training cases, ``momentum="local"``,
  one local epoch per round (a round is then one epoch of ordinary training plus the simulator's bookkeeping);
* ``federated``: 3 sites with their ``--cases`` each, FedAvg, one local epoch per round (``--fed-momentum``, default
  ``restart`` as ``monai-fedpriv simulate``).

One federated round processes the same samples as one local epoch (``--cases`` must be a multiple of the batch
size, so that no site pads its last batch; the stream loader's batches are always full). No evaluation set is given,
so a round is training + update exchange + aggregation only. Both simulators are built first (parsing, caching the
data and building the networks are not timed); then their rounds run alternately, one local round, one federated
round, and so on (each simulator runs in its own thread and hands the CPU to the other after every round, so only
one computes at a time and a busy machine slows both alike). Round 1 of each is a warm-up; the next ``--epochs``
rounds are timed and their medians reported:

* ``epoch_s_local`` / ``epoch_s_federated``: the ``seconds`` of the round records in the simulator's metrics (site
  training, sending the updates, screening and aggregation, publishing the new global model);
* ``round_wall_s_*``: wall time of the whole round as the simulator runs it, adding the per-round snapshot of every
  site's state, the checkpoint and ``metrics.json`` (what an experiment pays beyond training).

``ratio`` = federated / local (target of the brief: <= 1.05). SegResNet is a 3D network here: its timings are null
unless ``--include-3d`` times it on small synthetic 3D volumes (``--size-3d``, 1 channel, 3 classes).

Usage:
    python benchmarks/networks.py                                  # all networks, 64x64, 16 cases/site, 5 epochs
    python benchmarks/networks.py --networks monet unet --image-size 32 --cases 4 --epochs 1
    python benchmarks/networks.py --epochs 10 --json runs/bench/networks.json --device cuda --include-3d
    python benchmarks/networks.py --no-timing                      # the size table only
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brain_tissue_2d"
SITES = 3
NUM_CLASSES = 3  # the bundle's num_classes (background, grey matter, white matter)

#: name -> (one sample's input shape, outputs, seed Table 2 entry or None, where the input comes from)
SIZE_CASES: dict[str, tuple[tuple[int, ...], int, dict[str, float] | None, str]] = {
    "monet": ((1, 256, 256), 1, {"params": 390_000, "macs": 6.11e9}, "seed 000 Table 2"),
    "unet_mobilenet_v2": ((1, 256, 256), 1, {"params": 6.63e6, "macs": 3.37e9}, "seed 000 Table 2"),
    "unet_resnet18": ((1, 256, 256), 1, {"params": 14.32e6, "macs": 5.32e9}, "seed 000 Table 2"),
    "unet_vgg11_bn": ((1, 256, 256), 1, {"params": 18.26e6, "macs": 14.45e9}, "seed 000 Table 2"),
    "segresnet": ((4, 128, 128, 128), 3, None, "seed 001 BraTS (4 modalities, 3 regions)"),
    "unet": ((3, 224, 224), 1, None, "seed 004 FLAIR, 3 slices as channels"),
}
THREE_D = ("segresnet",)  # timed only with --include-3d, in 3D
MONET_NOTE = (
    "seed 000 reports MoNet at 390k parameters / 6.11 GMACs (its counting tool); the MoNet written here from the "
    "paper has 399,009 parameters and 4,741,660,672 MACs exactly (convolutions only)"
)


def _smp_problem() -> str | None:
    """Why segmentation-models-pytorch cannot be used here, or None."""
    try:
        import segmentation_models_pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - torchvision missing or broken surfaces as any error
        return f"segmentation-models-pytorch not importable ({type(exc).__name__}: {exc})"
    return None


def _gmacs(value: float | None) -> str:
    return f"{value / 1e9:.3f}" if value is not None else "-"


# ---------------------------------------------------------------------------------------------------------- size
def size_record(name: str, device: str) -> dict[str, Any]:
    """Parameters and exact MACs of ``name`` at its seed's input."""
    import torch

    from monai_fedpriv.networks import build_network, count_macs, count_parameters

    shape, outputs, table2, source = SIZE_CASES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_network(name, shape[0], outputs, spatial_dims=len(shape) - 1).to(device)
    rec: dict[str, Any] = {
        "params": count_parameters(net),
        "macs": count_macs(net, shape, include_norm=False),
        "macs_with_norm": count_macs(net, shape),
        "input_shape": list(shape),
        "out_channels": outputs,
        "input_source": source,
        "seed_table2": table2,
    }
    note = "MACs: convolutions (transposed ones at input positions) and linear layers; macs_with_norm adds norms"
    if name == "monet":
        note = MONET_NOTE + "; " + note
    elif table2 is not None:
        note = f"seed 000 Table 2: {table2['params'] / 1e6:.2f}M / {table2['macs'] / 1e9:.2f}G; " + note
    rec["macs_note"] = note
    del net
    return rec


# -------------------------------------------------------------------------------------------------------- timing
class _Lockstep:
    """Runs simulators in threads, one round at a time in turn (only one thread computes at any moment)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.cond = threading.Condition()
        self.turn = 0
        self.done: set[int] = set()
        self.walls: dict[str, list[float]] = {n: [] for n in names}
        self.errors: dict[str, BaseException] = {}
        self._t0: dict[str, float] = {}

    def _wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)
        self._t0[self.names[i]] = time.perf_counter()

    def _pass(self, i: int, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(i)
            n = len(self.names)
            nxt = [(i + k) % n for k in range(1, n + 1) if (i + k) % n not in self.done]
            self.turn = nxt[0] if nxt else -1
            self.cond.notify_all()

    def on_round(self, name: str) -> Callable[[dict[str, Any]], None]:
        """The simulator's ``on_round``: note the round's wall time, let the next simulator run one round."""
        i = self.names.index(name)

        def hand_over(_metrics: dict[str, Any]) -> None:
            self.walls[name].append(time.perf_counter() - self._t0[name])
            self._pass(i)
            self._wait(i)

        return hand_over

    def run(self, runs: dict[str, Callable[[], Any]]) -> None:
        def worker(i: int) -> None:
            name = self.names[i]
            try:
                self._wait(i)
                runs[name]()
            except BaseException as exc:  # noqa: BLE001 - reported in the record; the other simulator goes on
                self.errors[name] = exc
            finally:
                self._pass(i, finished=True)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(self.names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _bundle_copy(work: Path, name: str, spatial_dims: int) -> Path:
    """A copy of the default bundle whose ``network_def`` builds ``name`` through the network factory."""
    dest = work / f"bundle-{name}-{spatial_dims}d"
    shutil.copytree(BUNDLE / "configs", dest / "configs")
    train = json.loads((dest / "configs" / "train.json").read_text())
    train["network_def"] = {"_target_": "monai_fedpriv.networks.build_network", "name": name, "in_channels": 1,
                            "out_channels": "@num_classes"}  # fmt: skip
    if spatial_dims != 2:
        train["network_def"]["spatial_dims"] = spatial_dims
    (dest / "configs" / "train.json").write_text(json.dumps(train, indent=1))
    return dest


def build_data(work: Path, args: argparse.Namespace, spatial_dims: int) -> tuple[Path, dict[str, list[dict]], str]:
    """``(root, {site: training cases}, description)`` with ``--cases`` training cases at each of 3 sites.

    2D: ``--data`` if given, else the brain-tissue data set (3 sites with their own acquisitions), else (nilearn not
    installed) synthetic 2D phantoms of the same size; 3D: synthetic phantoms (1 MR channel, 3 classes).
    """
    from monai_fedpriv.data.msd import load_msd_datalist
    from monai_fedpriv.data.synthetic import write_msd_task

    if spatial_dims == 2 and args.data is not None:
        sites = _by_site(load_msd_datalist(args.data))
        short = {k: len(v) for k, v in sites.items() if len(v) < args.cases}
        if len(sites) < SITES or len(sites) - len(short) < SITES:
            raise SystemExit(f"--data {args.data}: need {SITES} institutions with >= {args.cases} training cases, "
                             f"found {({k: len(v) for k, v in sites.items()})}")  # fmt: skip
        chosen = [k for k in sites if k not in short][:SITES]
        return args.data, {k: sites[k][: args.cases] for k in chosen}, f"{args.data} (first {args.cases} per site)"
    if spatial_dims == 2:
        try:
            from monai_fedpriv.data.brain_tissue import build_brain_tissue_2d

            root = build_brain_tissue_2d(work / "data-2d", n_sites=SITES, cases_per_site=args.cases, val_per_site=0,
                                         image_size=args.image_size, seed=0)  # fmt: skip
            return root, _by_site(load_msd_datalist(root)), "brain_tissue_2d"
        except ImportError as exc:
            print(f"  (brain-tissue data need nilearn: {exc}; timing on synthetic 2D phantoms of the same size)")
    size = args.image_size if spatial_dims == 2 else args.size_3d
    root = write_msd_task(work / f"data-{spatial_dims}d-synthetic", n_cases=SITES * args.cases,
                          shape=(size,) * spatial_dims, spacing=(1.0,) * spatial_dims,
                          labels={0: "background", 1: "outer", 2: "inner"},
                          institutions=[f"site-{k + 1}" for k in range(SITES)])  # fmt: skip
    return root, _by_site(load_msd_datalist(root)), f"synthetic {spatial_dims}D phantoms (write_msd_task)"


def _image_shape(case: dict[str, Any]) -> list[int]:
    import nibabel as nib

    return [int(n) for n in nib.load(str(case["image"])).shape]  # type: ignore[attr-defined]


def _by_site(cases: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    sites: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        sites.setdefault(str(case["institution"]), []).append(case)
    return dict(sorted(sites.items()))


def time_network(
    name: str, spatial_dims: int, data: tuple[Path, dict[str, list[dict[str, Any]]], str], work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """Seconds per epoch of the same training locally (1 site) and federated (3 sites), rounds interleaved."""
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
    from monai_fedpriv.fl.strategies import FedAvg

    root, sites, description = data
    union = [c for cases in sites.values() for c in cases]
    bundle = BundleSpec(_bundle_copy(work, name, spatial_dims))
    overrides = {"dataset_dir": str(root), "batch_size": args.batch_size}
    rounds = 1 + args.epochs
    lock = _Lockstep(["local", "federated"])
    common: dict[str, Any] = {"rounds": rounds, "local_work": LocalWork(epochs=1), "seed": 0, "device": args.device,
                              "overrides": overrides, "progress": False}  # fmt: skip
    out = work / f"runs-{name}-{spatial_dims}d"
    sims = {
        "local": FederatedSimulator(bundle, {"local": union}, {}, output_dir=out / "local", momentum="local",
                                    label=f"{name} local", on_round=lock.on_round("local"), **common),
        "federated": FederatedSimulator(bundle, sites, {}, output_dir=out / "federated", strategy=FedAvg(),
                                        momentum=args.fed_momentum, label=f"{name} federated",
                                        on_round=lock.on_round("federated"), **common),
    }  # fmt: skip
    for sim in sims.values():
        sim.setup()  # not timed: parsing the bundle, caching the data, building the networks
    results: dict[str, dict[str, Any]] = {}

    def runner(arm: str) -> Callable[[], None]:
        def go() -> None:
            results[arm] = sims[arm].run()

        return go

    lock.run({arm: runner(arm) for arm in sims})
    rec: dict[str, Any] = {
        "timing_input": [1, *_image_shape(union[0])],
        "timing_out_channels": NUM_CLASSES,
        "timing_data": description,
        "batch_size": args.batch_size,
        "samples_per_epoch": len(union),
        "sites_federated": len(sites),
        "epochs_timed": args.epochs,
        "fed_momentum": args.fed_momentum,
    }
    for arm in sims:
        if arm in lock.errors:
            exc = lock.errors[arm]
            rec[f"error_{arm}"] = f"{type(exc).__name__}: {exc}"
        seconds = [float(r["seconds"]) for r in results.get(arm, {}).get("rounds", [])][1:]
        walls = lock.walls[arm][1:]
        rec[f"epoch_s_{arm}"] = statistics.median(seconds) if seconds else None
        rec[f"round_wall_s_{arm}"] = statistics.median(walls) if walls else None
        rec[f"epoch_s_{arm}_runs"] = seconds
        rec[f"round_wall_s_{arm}_runs"] = [round(w, 4) for w in walls]
    sims.clear()  # free the networks, data caches and engines before the next network
    results.clear()
    gc.collect()
    return rec


def _cell(value: float | None, width: int = 9, digits: int = 3) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


# ----------------------------------------------------------------------------------------------------------- main
def _parse(argv: list[str] | None) -> argparse.Namespace:
    import torch

    from monai_fedpriv.networks import NETWORKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    p.add_argument("--image-size", type=int, default=64, help="timing: image side in pixels (2D)")
    p.add_argument("--cases", type=int, default=16, help="timing: training cases per site (3 sites)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="timing: default the bundle's 8, or the largest divisor of --cases under 8")  # fmt: skip
    p.add_argument("--epochs", type=int, default=5, help="timed epochs (= federated rounds) after one warm-up")
    p.add_argument("--fed-momentum", default="restart", choices=("restart", "local", "aggregate"),
                   help="client optimiser policy of the federated run (local: always 'local')")  # fmt: skip
    p.add_argument("--data", type=Path, default=None,
                   help="timing (2D): an MSD-layout data set with >= 3 institutions to use instead of building one "
                   "(e.g. one built by build_brain_tissue_2d where nilearn is installed)")  # fmt: skip
    p.add_argument("--include-3d", action="store_true", help="also time segresnet in 3D on small synthetic volumes")
    p.add_argument("--size-3d", type=int, default=32, help="side of the 3D volumes of --include-3d")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-timing", action="store_true", help="the size table only")
    p.add_argument("--json", type=Path, default=None, help="write the list of records to this file")
    args = p.parse_args(argv)
    for flag in ("image_size", "cases", "epochs", "size_3d"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.batch_size is None:
        args.batch_size = max(b for b in range(1, 9) if args.cases % b == 0)
    elif args.batch_size < 1 or args.cases % args.batch_size:
        p.error(f"--cases ({args.cases}) must be a multiple of --batch-size ({args.batch_size}): every batch of "
                f"the stream loader is full, so otherwise the federated sites would train on more samples")  # fmt: skip
    if args.image_size < 16:
        p.error("--image-size must be >= 16 (the data builder's minimum)")
    if args.size_3d % 8:
        p.error("--size-3d must be a multiple of 8 (SegResNet downsamples 3 times)")
    return args


def _timing_problem(name: str, args: argparse.Namespace, smp_problem: str | None) -> str | None:
    if name.startswith("unet_") and smp_problem:
        return smp_problem
    if name in THREE_D and not args.include_3d:
        return "3D network: timed only with --include-3d"
    if name.startswith("unet_") and args.image_size % 32:
        return f"smp U-Nets need an image size divisible by 32, got {args.image_size}"
    if name == "monet" and args.image_size % 4:
        return f"MoNet needs an image size divisible by 4, got {args.image_size}"
    if name == "unet" and args.image_size % 16:
        return f"MONAI UNet (4 downsamplings) needs an image size divisible by 16, got {args.image_size}"
    return None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import warnings

    import torch

    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    smp_problem = _smp_problem()
    records: list[dict[str, Any]] = []

    print(f"== size (parameters, exact MACs at the seeds' inputs; device {args.device}) ==", flush=True)
    print(f"{'network':<18} {'input':<16} {'out':>3} {'params':>12} {'GMACs':>8} {'+norm':>8}  seed Table 2",
          flush=True)  # fmt: skip
    for name in args.networks:
        shape, outputs, table2, _ = SIZE_CASES[name]
        rec: dict[str, Any] = {"name": name, "params": None, "macs": None, "device": args.device,
                               "epoch_s_local": None, "epoch_s_federated": None, "ratio": None}  # fmt: skip
        if name.startswith("unet_") and smp_problem:
            rec.update({"input_shape": list(shape), "out_channels": outputs, "skipped": smp_problem})
            print(f"{name:<18} skipped: {smp_problem}", flush=True)
            records.append(rec)
            continue
        rec.update(size_record(name, args.device))
        ref = f"{table2['params'] / 1e6:.2f}M / {table2['macs'] / 1e9:.2f}G" if table2 else "-"
        shape_s = "x".join(map(str, shape))
        print(f"{name:<18} {shape_s:<16} {outputs:>3} {rec['params']:>12,} {_gmacs(rec['macs']):>8} "
              f"{_gmacs(rec['macs_with_norm']):>8}  {ref}", flush=True)  # fmt: skip
        records.append(rec)
    if any(r["name"] == "monet" for r in records):
        print(f"  note: {MONET_NOTE}.", flush=True)

    if not args.no_timing:
        print(f"\n== seconds per epoch: local (1 site, {SITES * args.cases} cases) vs federated ({SITES} sites x "
              f"{args.cases}, FedAvg), {args.epochs} timed epochs after 1 warm-up, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads ==", flush=True)  # fmt: skip
        print(f"{'network':<18} {'input':<12} {'local s':>9} {'fed s':>9} {'ratio':>6}  "
              f"{'wall local':>10} {'wall fed':>9} {'ratio':>6}", flush=True)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="bench_networks_") as tmp:
            work = Path(tmp)
            data: dict[int, Any] = {}
            for rec in records:
                name = rec["name"]
                problem = _timing_problem(name, args, smp_problem)
                if problem:
                    rec["timing_skipped"] = problem
                    print(f"{name:<18} timing skipped: {problem}", flush=True)
                    continue
                dims = 3 if name in THREE_D else 2
                if dims not in data:
                    data[dims] = build_data(work, args, dims)
                rec.update(time_network(name, dims, data[dims], work, args))
                rec["ratio"] = _ratio(rec["epoch_s_federated"], rec["epoch_s_local"])
                rec["wall_ratio"] = _ratio(rec["round_wall_s_federated"], rec["round_wall_s_local"])
                shape_s = "x".join(map(str, rec["timing_input"]))
                cells = [_cell(rec["epoch_s_local"]), _cell(rec["epoch_s_federated"]), _cell(rec["ratio"], 6, 2),
                         " " + _cell(rec["round_wall_s_local"], 10), _cell(rec["round_wall_s_federated"]),
                         _cell(rec["wall_ratio"], 6, 2)]  # fmt: skip
                print(f"{name:<18} {shape_s:<12} " + " ".join(cells), flush=True)
                for arm in ("local", "federated"):
                    if f"error_{arm}" in rec:
                        print(f"  {arm} failed: {rec[f'error_{arm}']}", flush=True)
        ratios = [r["ratio"] for r in records if r.get("ratio") is not None]
        if ratios:
            met = sum(r <= 1.05 for r in ratios)
            print(f"federated / local seconds per epoch: {min(ratios):.2f}-{max(ratios):.2f}x; target <= 1.05x met by "
                  f"{met} of {len(ratios)} networks (wall columns add per-round snapshots, checkpoint and "
                  f"metrics.json)", flush=True)  # fmt: skip
    for rec in records:  # JSON has no NaN; keep nulls for anything not measured
        for key, value in rec.items():
            if isinstance(value, float) and not math.isfinite(value):
                rec[key] = None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
