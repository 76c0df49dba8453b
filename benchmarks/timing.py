"""What the side-by-side benchmarks share: interleaved repetitions of several ways of doing the same work (so a busy
machine slows them alike), their medians, and the JSON they print and keep."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def interleaved_medians(runs: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each run over ``repeats`` rounds (one warm-up each first), the runs taking turns."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def emit(result: dict[str, Any], path: Path | None) -> None:
    """Print ``result`` as JSON and write it to ``path`` (when given)."""
    text = json.dumps(result, indent=1)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
