"""Seconds beyond compute of the in-process simulator's rounds, for this checkout and a reference checkout (e.g. the
code before a change to the run loop), side by side in one run.

The job is ``nvflare_overhead.py``'s: 3 sites, 3 rounds, 1 local step per round, the default bundle shrunk to 32x32
images and a 2-level U-Net, the global model scored every round. Each repetition runs the job once per checkout in a
fresh Python process (``PYTHONPATH`` pointing at that checkout), interleaved, and subtracts the same plain-loop
compute measured in that process; the median over repetitions is reported.

Usage:
    git worktree add /tmp/before <commit>
    python benchmarks/round_overhead.py --reference /tmp/before --repeats 5 --json runs/bench/round_overhead.json

Target (issue 17): one round of the run loop costs no more than before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import importlib.util, json, sys, tempfile, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("overhead", {bench!r})
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
import monai_fedpriv
assert Path(monai_fedpriv.__file__).resolve().is_relative_to(Path({tree!r}).resolve()), monai_fedpriv.__file__
with tempfile.TemporaryDirectory() as tmp:
    bundle, ctx = bench._setup(Path(tmp))
    bench._compute_seconds(ctx)  # warm-up
    compute = bench._compute_seconds(ctx)
    bench._in_process(ctx, Path(tmp) / "warm")  # first-call costs of the simulator's imports
    wall = bench._in_process(ctx, Path(tmp) / "run")
print(json.dumps({{"compute_s": compute, "wall_s": wall}}))
"""


def _measure(tree: Path) -> dict[str, float]:
    code = CHILD.format(bench=str(ROOT / "benchmarks" / "nvflare_overhead.py"), tree=str(tree))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    # run from the checkout itself: ``python -c`` puts the working folder first on sys.path
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False, cwd=tree)
    if res.returncode != 0:
        raise RuntimeError(f"measuring {tree} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["beyond_compute_s"] = out["wall_s"] - out["compute_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, required=True, help="the other checkout (a git worktree)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (median reported)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"this": [], "reference": []}
    for _ in range(args.repeats):
        runs["this"].append(_measure(ROOT))
        runs["reference"].append(_measure(args.reference))
    rows = {name: {key: round(statistics.median(r[key] for r in rs), 3) for key in ("compute_s", "wall_s",
                                                                                    "beyond_compute_s")}
            for name, rs in runs.items()}  # fmt: skip
    ratio = rows["this"]["beyond_compute_s"] / rows["reference"]["beyond_compute_s"]
    result = {"sites": 3, "rounds": 3, "local_steps": 1, "repeats": args.repeats, "reference": str(args.reference),
              "checkouts": rows, "runs": runs, "this_vs_reference_beyond_compute": round(ratio, 3)}  # fmt: skip
    for name, row in rows.items():
        print(f"{name:<10} wall {row['wall_s']:.3f} s, compute {row['compute_s']:.3f} s, beyond compute "
              f"{row['beyond_compute_s']:.3f} s ({row['beyond_compute_s'] / 3:.3f} s a round)")
    print(f"this / reference (beyond compute): {ratio:.2f}x (target <= 1.0x, within noise)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
