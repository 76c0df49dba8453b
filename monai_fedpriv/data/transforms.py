"""Transforms and an inferer that MONAI does not have, for the seeds' tasks (usable by name in bundle configs).

* :class:`SelectChannelsd`: keep some input channels (e.g. T2-FLAIR out of BraTS' four modalities).
* :class:`SlicesToChannelsd`: a ``(C, H, W, S)`` crop of ``S`` consecutive axial slices becomes a 2D sample with
  ``C * S`` channels; the label keeps its central slice (seed 004, section 4.3: "three consecutive axial slices as
  the input").
* :class:`ContextSliceInferer`: the matching whole-volume inference: every axial slice is predicted from itself and
  its neighbours (edges repeated), and the 2D predictions are stacked back into a volume.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.inferers import Inferer
from monai.transforms import MapTransform

__all__ = ["ContextSliceInferer", "SelectChannelsd", "SlicesToChannelsd"]


class SelectChannelsd(MapTransform):
    """Keep the channels ``channels`` (indices along the first axis) of each key's channel-first array."""

    def __init__(self, keys: KeysCollection, channels: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in channels):
            raise ValueError(f"channels must be non-negative channel indices, got {channels!r}.")
        self.channels = [int(c) for c in channels]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            n = d[key].shape[0]
            if max(self.channels) >= n:
                raise ValueError(f"'{key}' has {n} channels; cannot select channels {self.channels}.")
            d[key] = d[key][self.channels]
        return d


class SlicesToChannelsd(MapTransform):
    """``image`` ``(C, H, W, S)`` -> ``(C * S, H, W)`` (channel ``c * S + s`` is slice ``s`` of channel ``c``);
    ``label`` ``(L, H, W, S)`` -> ``(L, H, W)``, the central slice (``S`` must be odd)."""

    def __init__(self, image_key: str = "image", label_key: str | None = "label") -> None:
        super().__init__([image_key] + ([label_key] if label_key else []), allow_missing_keys=True)
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        if image.ndim != 4:
            raise ValueError(f"SlicesToChannelsd expects (C, H, W, S) images, got shape {tuple(image.shape)}.")
        c, h, w, s = image.shape
        if s % 2 == 0:
            raise ValueError(f"SlicesToChannelsd needs an odd number of slices, got {s}.")
        d[self.image_key] = image.permute(0, 3, 1, 2).reshape(c * s, h, w)
        if self.label_key and self.label_key in d:
            d[self.label_key] = d[self.label_key][..., s // 2]
        return d


class ContextSliceInferer(Inferer):
    """Predict a ``(B, C, H, W, D)`` volume slice by slice with a 2D network that takes each axial slice with its
    ``context // 2`` neighbours on each side as channels (the layout of :class:`SlicesToChannelsd`).

    Args:
        context: slices per input (odd).
        batch_size: slices per network call.
    """

    def __init__(self, context: int = 3, batch_size: int = 16) -> None:
        if context < 1 or context % 2 == 0:
            raise ValueError(f"context must be a positive odd number of slices, got {context!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
        super().__init__()
        self.context = int(context)
        self.batch_size = int(batch_size)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        if inputs.ndim != 5:
            raise ValueError(f"ContextSliceInferer expects (B, C, H, W, D) volumes, got shape {tuple(inputs.shape)}.")
        if hasattr(inputs, "as_tensor"):  # a MetaTensor: slicing and stacking work on the plain data
            inputs = inputs.as_tensor()
        b, c, h, w, depth = inputs.shape
        half = self.context // 2
        padded = torch.cat([inputs[..., :1]] * half + [inputs] + [inputs[..., -1:]] * half, dim=-1)
        # (B, C, H, W, D, S) -> (B, D, C, S, H, W) -> (B * D, C * S, H, W)
        windows = padded.unfold(-1, self.context, 1).permute(0, 4, 1, 5, 2, 3)
        windows = windows.reshape(b * depth, c * self.context, h, w)
        outputs = [network(windows[k : k + self.batch_size], *args, **kwargs)
                   for k in range(0, windows.shape[0], self.batch_size)]  # fmt: skip
        out = torch.cat(outputs, dim=0)
        return out.reshape(b, depth, out.shape[1], h, w).permute(0, 2, 3, 4, 1)
