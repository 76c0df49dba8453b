"""The default bundle runs with MONAI's own bundle runner, and its override files fail clearly when misused."""

import pytest
import torch
from monai.bundle import ConfigParser, run

from monai_fedpriv.bundle.loader import shared_config
from tests.conftest import BUNDLE_DIR, tiny_overrides


def test_train_json_trains_one_site_with_monai_bundle_run(tiny_data, tmp_path):
    run(
        config_file=str(BUNDLE_DIR / "configs" / "train.json"),
        bundle_root=str(tmp_path),
        max_epochs=2,
        **{**tiny_overrides(tiny_data), "train#handlers#0#interval": 1},
    )
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_DIR / "configs" / "train.json"))
    for key, value in tiny_overrides(tiny_data).items():
        parser[key] = value
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(weights)


def test_fed_json_without_a_transport_says_where_it_comes_from(tiny_data, tmp_path):
    files = [str(BUNDLE_DIR / "configs" / "train.json"), str(shared_config("fed.json"))]
    with pytest.raises(Exception) as info:
        run(config_file=files, bundle_root=str(tmp_path), max_epochs=1, **tiny_overrides(tiny_data))
    chain, exc = [], info.value
    while exc is not None:  # MONAI wraps the handler's own error; it is in the cause chain
        chain.append(str(exc))
        exc = exc.__cause__
    assert any("fed_transport" in msg and "monai-fedpriv simulate" in msg for msg in chain), chain
