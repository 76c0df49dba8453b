"""Step time and peak memory of one training step: non-private vs Opacus' default DP path vs this project's path.

Step times of the three methods are measured in one process with their steps interleaved round-robin (a shared,
busy CPU then slows all of them alike); peak memory (max RSS on CPU, max allocated on GPU) is measured for each
(case, method) in a fresh subprocess so that it belongs to that method alone.

The "opacus" method is what ``PrivacyEngine.make_private`` builds by default (``ModuleValidator.fix`` +
``GradSampleModule`` hooks + ``DPOptimizer``); "project" is ``monai_fedpriv.privacy.make_site_private`` with
``--project-mode`` (default ``hooks``: frozen-weight forward, tensor hooks, per-shape convolution samplers).
Both private paths produce the same clipped-and-noised update (tested in ``tests/test_dp_sgd.py``).

Usage:
    python benchmarks/dp_step.py                       # 2D UNet, batch 8 and 32, on CPU (or GPU if present)
    python benchmarks/dp_step.py --cases 2d-b8 3d-b2 --steps 5 --json results.json
    python benchmarks/dp_step.py --project-mode functorch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES: dict[str, dict[str, Any]] = {
    "2d-b8": {"dims": 2, "size": 64, "batch": 8},
    "2d-b32": {"dims": 2, "size": 64, "batch": 32},
    "3d-b2": {"dims": 3, "size": 64, "batch": 2},
    "3d-b4": {"dims": 3, "size": 96, "batch": 4},
}
METHODS = ("nonprivate", "opacus", "project")


def _network(dims: int):
    from monai.networks.nets import UNet

    # the default bundle's network (bundles/brain_tissue_2d/configs/train.json), in 2D or 3D
    return UNet(dims, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1, norm="INSTANCE")


def _build(case: str, method: str, project_mode: str, device: Any):
    """(step function, spec) for one method on one case."""
    import torch
    from monai.losses import DiceCELoss
    from torch.utils.data import DataLoader, TensorDataset

    spec = CASES[case]
    torch.manual_seed(0)
    shape = (spec["batch"], 1) + (spec["size"],) * spec["dims"]
    x = torch.rand(shape, device=device)
    y = torch.randint(0, 3, shape, device=device)
    net = _network(spec["dims"]).to(device).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt: Any = torch.optim.Adam(net.parameters(), lr=1e-3)
    model: Any = net
    if method == "opacus":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        net = ModuleValidator.fix(net)
        model = GradSampleModule(net)
        opt = DPOptimizer(
            torch.optim.Adam(net.parameters(), lr=1e-3),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=spec["batch"],
        )
    elif method == "project":
        from monai_fedpriv.privacy import DPSettings, PrivacyBudget, make_site_private, prepare_for_dp

        net, _ = prepare_for_dp(net, x[:2])
        loader = DataLoader(TensorDataset(torch.zeros(spec["batch"] * 10, 1)), batch_size=spec["batch"])
        parts = make_site_private(
            net,
            opt,
            loader,
            settings=DPSettings(1.0, 1.0, grad_sample_mode=project_mode),
            budget=PrivacyBudget(),  # no limit: the benchmark times steps, it does not stop on epsilon
            sampler_generator=torch.Generator().manual_seed(0),
            noise_generator=torch.Generator(device=device).manual_seed(1),
        )
        model, opt = parts.network, parts.optimizer

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return step


def time_case(case: str, steps: int, warmup: int, project_mode: str, device_name: str) -> dict[str, float]:
    """Median seconds per step of each method, steps interleaved round-robin so that a busy machine slows all
    methods alike (the ratios stay meaningful on a shared CPU)."""
    import warnings

    import torch

    # Opacus' module hooks warn when the network input does not require grad (it never does here)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    device = torch.device(device_name)
    fns = {m: _build(case, m, project_mode, device) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(warmup + steps):
        for m, fn in fns.items():
            t = fn()
            if i >= warmup:
                times[m].append(t)
    return {m: statistics.median(v) for m, v in times.items()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory(case: str, method: str, project_mode: str, device_name: str) -> float:
    """Peak memory in MiB of building and running two steps of one method, above the process' memory before.

    On GPU: ``torch.cuda.max_memory_allocated``. On CPU: the resident set size sampled every millisecond by a thread,
    minus its value after the imports (run in a fresh process, see ``_memory_isolated``).
    """
    import threading

    import torch

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn = _build(case, method, project_mode, device)
        fn()
        fn()
        return torch.cuda.max_memory_allocated(device) / 2**20
    import monai  # noqa: F401
    import opacus  # noqa: F401

    import monai_fedpriv.privacy  # noqa: F401

    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn = _build(case, method, project_mode, device)
    fn()
    fn()
    done.set()
    thread.join()
    return max(peak[0], _rss_mb()) - base


def _memory_isolated(case: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_single", case, method, "--project-mode", args.project_mode,
           "--device", args.device]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None, help="default: 2D cases (+3D on GPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--project-mode", default="hooks", help="grad_sample_mode of the project's path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", type=Path, default=None, help="write results to this file")
    p.add_argument("--_single", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._single:
        print(json.dumps({"peak_mb": peak_memory(*args._single, args.project_mode, args.device)}))
        return 0
    cases = args.cases or (["2d-b8", "2d-b32"] + (["3d-b2", "3d-b4"] if args.device.startswith("cuda") else []))
    results = []
    for case in cases:
        row: dict[str, Any] = {"name": f"UNet {case}", "device": args.device, "project_mode": args.project_mode}
        row["threads"] = torch.get_num_threads()
        for method, seconds in time_case(case, args.steps, args.warmup, args.project_mode, args.device).items():
            row[f"{method}_s"] = seconds
        for method in METHODS:
            r = _memory_isolated(case, method, args) if not args.no_memory else {}
            row[f"{method}_mb"] = r.get("peak_mb")
            if "error" in r:
                row[f"{method}_error"] = r["error"]
        base = row["nonprivate_s"]
        for method in ("opacus", "project"):
            row[f"{method}_ratio"] = row[f"{method}_s"] / base if base and row[f"{method}_s"] else None
        results.append(row)
        print(
            f"{row['name']:<14} {args.device:<5} nonprivate {base or float('nan'):.3f}s  "
            f"opacus {row['opacus_s'] or float('nan'):.3f}s (x{row['opacus_ratio'] or float('nan'):.2f})  "
            f"project[{args.project_mode}] {row['project_s'] or float('nan'):.3f}s "
            f"(x{row['project_ratio'] or float('nan'):.2f})  "
            f"peak MiB {row['nonprivate_mb'] or 0:.0f}/{row['opacus_mb'] or 0:.0f}/{row['project_mb'] or 0:.0f}",
            flush=True,
        )
        for method in METHODS:
            if f"{method}_error" in row:
                print(f"  {method} failed: {row[f'{method}_error']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
