"""benchmarks/networks.py: rounds of the two simulators alternate, and a tiny run gives one full record per network."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "networks.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_networks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_networks"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_networks", None)


def test_lockstep_runs_one_round_of_each_in_turn_and_survives_a_failure(bench):
    order = []
    lock = bench._Lockstep(["a", "b"])

    def fake(name, rounds, fail_at=None):
        callback = lock.on_round(name)

        def run():
            for r in range(1, rounds + 1):
                if r == fail_at:
                    raise RuntimeError("boom")
                order.append((name, r))
                callback({})

        return run

    lock.run({"a": fake("a", 3), "b": fake("b", 4)})
    assert order == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3), ("b", 4)]
    assert [len(lock.walls[n]) for n in "ab"] == [3, 4]

    order.clear()
    lock = bench._Lockstep(["a", "b"])
    lock.run({"a": fake("a", 3, fail_at=2), "b": fake("b", 3)})
    assert order == [("a", 1), ("b", 1), ("b", 2), ("b", 3)]
    assert isinstance(lock.errors["a"], RuntimeError) and "b" not in lock.errors


def test_cases_must_fill_every_batch(bench):
    with pytest.raises(SystemExit):
        bench._parse(["--cases", "6", "--batch-size", "4"])
    assert bench._parse(["--cases", "6"]).batch_size == 6
    assert bench._parse(["--cases", "20"]).batch_size == 5


def test_tiny_run_writes_one_record_per_network(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bench.SIZE_CASES, "segresnet", ((4, 16, 16, 16), 3, None, "small for the test"))  # not 128^3
    out = tmp_path / "networks.json"
    records = bench.main(["--networks", "unet", "segresnet", "--image-size", "32", "--cases", "2", "--epochs", "1",
                          "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == records
    unet, segresnet = records
    for rec in records:
        assert {"name", "params", "macs", "device", "epoch_s_local", "epoch_s_federated"} <= rec.keys()
    assert (unet["params"], unet["input_shape"], unet["out_channels"]) == (1_625_420, [3, 224, 224], 1)
    assert (segresnet["params"], segresnet["input_shape"]) == (1_176_843, [4, 16, 16, 16])
    assert unet["epoch_s_local"] > 0 and unet["epoch_s_federated"] > 0 and unet["ratio"] > 0
    assert unet["samples_per_epoch"] == 6 and len(unet["epoch_s_federated_runs"]) == 1
    assert segresnet["epoch_s_local"] is None and "--include-3d" in segresnet["timing_skipped"]
    assert "seconds per epoch" in capsys.readouterr().out
