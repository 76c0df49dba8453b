import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from monai_fedpriv.privacy.cli import privacy_main

ARGS = ["--sample-rate", "0.02", "--steps", "400", "--delta", "1e-5"]


def test_prints_epsilon_per_accountant(capsys):
    assert privacy_main([*ARGS, "--noise-multiplier", "1.1"]) == 0
    out = capsys.readouterr().out
    rdp = RDPAccountant()
    rdp.history = [(1.1, 0.02, 400)]
    prv = PRVAccountant()
    prv.history = [(1.1, 0.02, 400)]
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert float(lines["rdp"][2]) == pytest.approx(rdp.get_epsilon(1e-5), abs=1e-4)
    assert float(lines["prv"][2]) == pytest.approx(prv.get_epsilon(delta=1e-5), abs=1e-4)


def test_json_and_solve_for_noise(capsys):
    assert privacy_main([*ARGS, "--target-epsilon", "2.0", "--accountant", "rdp", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["results"]
    assert row["accountant"] == "rdp" and result["target_epsilon"] == 2.0
    assert 1.98 <= row["epsilon"] <= 2.0
    assert privacy_main([*ARGS, "--noise-multiplier", str(row["noise_multiplier"]), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["results"][0]
    assert again["epsilon"] == pytest.approx(row["epsilon"])


def test_bad_arguments(capsys):
    assert privacy_main(["--sample-rate", "1.5", "--steps", "10", "--delta", "1e-5", "--noise-multiplier", "1"]) == 2
    assert "sample_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        privacy_main(ARGS)  # neither --noise-multiplier nor --target-epsilon
    with pytest.raises(SystemExit):
        privacy_main([*ARGS, "--noise-multiplier", "1", "--target-epsilon", "2"])
