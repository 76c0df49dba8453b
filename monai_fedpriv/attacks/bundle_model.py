"""The bundle's side of a leakage audit: its network and loss from ``configs/train.json``, its output convention and
pixel range, and a saved global model loaded into it (prepared as DP-SGD sites prepared it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.errors import BundleError, DataError
from monai_fedpriv.fl.weights import strip_prefixes
from monai_fedpriv.privacy.model_prep import load_trained_weights

__all__ = ["bundle_activation", "load_bundle_model", "load_checkpoint"]


def _find_pixel_range(config: Any) -> tuple[float, float] | None:
    """The output range of the first ``ScaleIntensity*`` transform found in a raw bundle config."""
    if isinstance(config, dict):
        target = str(config.get("_target_", ""))
        if "ScaleIntensityRange" in target and "b_min" in config and "b_max" in config:
            return float(config["b_min"]), float(config["b_max"])
        if "ScaleIntensity" in target and "minv" in config and "maxv" in config:
            return float(config["minv"]), float(config["maxv"])
        items = list(config.values())
    elif isinstance(config, list):
        items = config
    else:
        return None
    for item in items:
        found = _find_pixel_range(item)
        if found is not None:
            return found
    return None


def load_bundle_model(
    bundle_dir: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, torch.nn.Module, tuple[float, float]]:
    """Build ``network_def`` and ``loss`` of ``BUNDLE_DIR/configs/train.json`` (with ``overrides``, e.g. the input
    channels of a team's data) and read its pixel range.

    Returns:
        ``(network, loss, pixel_range)``; the loss defaults to ``DiceCELoss(to_onehot_y=True, softmax=True)`` and
        the range to ``(0, 1)`` when the config does not say.

    Raises:
        BundleError: when the config file or its ``network_def`` is missing or cannot be built.
    """
    from monai.losses import DiceCELoss

    parser, config_file = _train_parser(bundle_dir, overrides)
    if parser.get("network_def") is None:
        raise BundleError(f"{str(config_file)!r} defines no 'network_def'; the attack needs the network.")
    try:
        network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as err:  # noqa: BLE001 - any failure to build is a bundle error naming the file
        raise BundleError(f"cannot build 'network_def' of {str(config_file)!r}: {err}") from err
    if not isinstance(network, torch.nn.Module):
        raise BundleError(f"'network_def' of {str(config_file)!r} is a {type(network).__name__}, not a torch module.")
    loss = parser.get_parsed_content("loss", instantiate=True) if parser.get("loss") is not None else None
    if loss is None:
        loss = DiceCELoss(to_onehot_y=True, softmax=True)
    pixel_range = _find_pixel_range(parser.config) or (0.0, 1.0)
    return network, loss, pixel_range


def bundle_activation(bundle_dir: str | Path) -> str:
    """The bundle's output convention (``eval_activation`` of ``configs/train.json``; ``"softmax"`` if unset).

    Raises:
        BundleError: a value other than ``"softmax"`` or ``"sigmoid"`` (as the evaluator refuses it).
    """
    parser, config_file = _train_parser(bundle_dir)
    value = parser.get("eval_activation", "softmax")
    if value not in ("softmax", "sigmoid"):
        raise BundleError(f"{str(config_file)!r}: 'eval_activation' must be 'softmax' or 'sigmoid', got {value!r}.")
    return str(value)


def _train_parser(bundle_dir: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Any, Path]:
    """A ``ConfigParser`` of ``BUNDLE_DIR/configs/train.json`` with ``overrides`` set, and the file's path."""
    from monai.bundle import ConfigParser

    config_file = Path(bundle_dir) / "configs" / "train.json"
    if not config_file.is_file():
        raise BundleError(f"bundle {str(bundle_dir)!r} has no configs/train.json.")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser, config_file


def load_checkpoint(network: torch.nn.Module, path: str | Path, example_input: torch.Tensor | int) -> torch.nn.Module:
    """Load a saved global model (a plain or ``{"network"|"model"|"state_dict": ...}`` state dict, wrapper prefixes
    allowed); a model trained under DP-SGD is loaded into the network prepared as its sites prepared it, which
    needs an input of the network's shape: ``example_input`` (a batch), or an image side for a batch of 2D zeros
    with the network's ``in_channels``."""
    if not Path(path).is_file():
        raise DataError(f"--checkpoint {path} does not exist or is not a file.")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the loader trips on, the file is not a checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
        raise DataError(
            f"--checkpoint {path} is not a PyTorch checkpoint of model weights ({type(err).__name__}: {first[:120]})."
        ) from err
    for key in ("network", "model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise DataError(f"--checkpoint {path}: expected a state dict, got {type(state).__name__}.")
    if isinstance(example_input, torch.Tensor):
        example = example_input
    else:
        example = torch.zeros(2, int(getattr(network, "in_channels", 1) or 1), example_input, example_input)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"--checkpoint {path}: expected a state dict of tensors (model weights), got other values.")
    try:
        return load_trained_weights(network, strip_prefixes(state), example)
    except (KeyError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"--checkpoint {path} does not fit the bundle's network: {first[:300]}") from err
