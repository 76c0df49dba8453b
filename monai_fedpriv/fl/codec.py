"""Byte encoding of a :class:`~monai_fedpriv.fl.update.ModelUpdate`: what actually crosses the wire.

Li et al. (2019, section 2.3) leave "utilising the sparse property of dW to reduce the communication overheads"
for future work; this module does it. Layout of an encoded update::

    b"MFPU" | version (1 byte) | header length (uint32, little-endian) | header (UTF-8 JSON, zlib) | payload

The header holds ``site``, ``round``, ``n_samples``, ``local_steps``, ``meta`` and, per tensor, its key, shape,
dtype, encoding and block sizes. The payload holds, tensor after tensor:

* dense tensors (no mask): the raw little-endian bytes of every element;
* sparse tensors (with a mask): a position block, then the raw little-endian values of the shared coordinates
  only, in increasing flat-index order. The position block is, whichever is smallest for that tensor:
  ``"indices"`` (int32 flat indices), ``"bitmap"`` (the mask packed 8 coordinates per byte, least significant bit
  first), ``"bitmap_deflate"`` (that bitmap compressed with zlib) or ``"gaps_rice"`` (the gaps between shared
  indices, Golomb-Rice coded: about 4.7 to 5 bits per shared coordinate at q = 10%, against 8 for a bitmap). At
  q = 10% of a float32 update, int32 indices alone would cap the saving at 5x and a raw bitmap at 7.6x; the two
  compressed codes are what bring it past 8x.

Optimiser-state tensors, if any, follow as dense tensors. Decoding is exact for every tensor and mask; the values
of unshared coordinates are not sent and decode as zero (aggregators ignore them). Decoding
(:mod:`monai_fedpriv.fl.decoding`) treats the bytes as hostile: caps, typed fields and, with an
:class:`~monai_fedpriv.fl.wire.Expected` (the server's global model, the site it asked, the round in progress),
nothing is allocated that is not the expected model's (:mod:`monai_fedpriv.fl.wire`). ``meta`` goes through JSON, so
tuples come back as lists and it must not contain NaN or Inf.

Example::

    data = encode_update(update)
    assert decode_update(data).masks.keys() == update.masks.keys()
    print(encoded_size(update), update.dense_bytes())
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.decoding import decode_global, decode_update
from monai_fedpriv.fl.messages import TENSOR_MESSAGES, Activations
from monai_fedpriv.fl.positions import encode_positions
from monai_fedpriv.fl.tensor_codec import TENSOR_MAGIC, ShapeExpect, decode_tensor_message, encode_tensor_message
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate
from monai_fedpriv.fl.wire import CODEC_VERSION, DTYPE_NAMES, DTYPES, GLOBAL_MAGIC, MAGIC, PREFIX, Expected

__all__ = [
    "CODECS", "CODEC_VERSION", "Expected", "decode", "decode_global", "decode_update", "encode", "encode_global",
    "encode_update", "encoded_size",
]  # fmt: skip

_DTYPES = DTYPES
_NAMES = DTYPE_NAMES


def _dtype_name(t: torch.Tensor, key: str) -> str:
    if t.dtype not in _NAMES:
        raise UpdateError(f"cannot encode tensor {key!r} of dtype {t.dtype}; supported: {sorted(_DTYPES)}.")
    return _NAMES[t.dtype]


def _raw(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    arr = flat.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _encode_tensors(
    tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None, who: str
) -> tuple[list[dict[str, Any]], list[bytes]]:
    entries: list[dict[str, Any]] = []
    blocks: list[bytes] = []
    for key, t in tensors.items():
        entry: dict[str, Any] = {"key": key, "shape": list(t.shape), "dtype": _dtype_name(t, key)}
        if masks is None:
            values = _raw(t)
            entry.update(encoding="dense", pos_bytes=0, val_bytes=len(values))
            blocks.append(values)
        else:
            if key not in masks:
                raise UpdateError(f"{who}: sparse update has no mask for key {key!r}.")
            m = masks[key]
            if m.dtype != torch.bool or tuple(m.shape) != tuple(t.shape):
                raise UpdateError(f"{who}: mask of {key!r} must be bool with shape {tuple(t.shape)}.")
            flat_mask = m.detach().to("cpu").reshape(-1).numpy()
            encoding, pos = encode_positions(flat_mask)
            values = _raw(t.detach().to("cpu").reshape(-1)[torch.from_numpy(flat_mask)])
            entry.update(encoding=encoding, count=int(flat_mask.sum()), pos_bytes=len(pos), val_bytes=len(values))
            blocks += [pos, values]
        entries.append(entry)
    return entries, blocks


def encode_update(update: ModelUpdate) -> bytes:
    """Serialise ``update``; sparse tensors send only their shared coordinates.

    Raises:
        UpdateError: unsupported dtype, bad or missing mask, or a ``meta`` that is not JSON-serialisable.
    """
    who = f"update from {update.site!r} (round {update.round})"
    entries, opt_entries, blocks = _encode_body(update.delta, update.masks, update.optimizer_state, who)
    header = {
        "site": update.site,
        "round": update.round,
        "n_samples": update.n_samples,
        "local_steps": update.local_steps,
        "sparse": update.masks is not None,
        "tensors": entries,
        "optimizer_state": opt_entries,
        "meta": update.meta,
    }
    return _pack(MAGIC, header, blocks, who)


def encoded_size(update: ModelUpdate) -> int:
    """Bytes :func:`encode_update` produces for ``update`` (what ``bytes_sent`` should report)."""
    return len(encode_update(update))


def _pack(magic: bytes, header: dict[str, Any], blocks: list[bytes], who: str) -> bytes:
    try:
        head = zlib.compress(json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8"), 9)
    except (TypeError, ValueError) as exc:
        raise UpdateError(f"{who}: header/meta is not JSON-serialisable: {exc}") from exc
    return b"".join([PREFIX.pack(magic, CODEC_VERSION, len(head)), head, *blocks])


def _encode_body(
    tensors: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None,
    optimizer_state: Mapping[str, torch.Tensor] | None,
    who: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[bytes]]:
    """``(entries, optimizer entries or None, blocks)``: the header entries and the bytes after the header."""
    entries, blocks = _encode_tensors(tensors, masks, who)
    if optimizer_state is None:
        return entries, None, blocks
    opt_entries, opt_blocks = _encode_tensors(optimizer_state, None, who)
    return entries, opt_entries, [*blocks, *opt_blocks]


def encode_global(model: GlobalModel) -> bytes:
    """Serialise the server's answer (dense weights and optional aggregated moments) for a remote transport."""
    who = f"global model of round {model.round}"
    entries, opt_entries, blocks = _encode_body(model.weights, None, model.optimizer_state, who)
    header = {
        "kind": model.kind,
        "round": model.round,
        "stop": model.stop,
        "tensors": entries,
        "optimizer_state": opt_entries,
        "instructions": {site: instr.to_json() for site, instr in model.instructions.items()},
    }
    return _pack(GLOBAL_MAGIC, header, blocks, who)


#: the codec of every message kind: ``kind -> (encode, decode)``; a kind is added here with its decoder, which must
#: treat the bytes as hostile (:mod:`monai_fedpriv.fl.decoding`)
CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[..., Any]]] = {
    ModelUpdate.kind: (encode_update, decode_update),
    GlobalModel.kind: (encode_global, decode_global),
    **{kind: (encode_tensor_message, decode_tensor_message) for kind in TENSOR_MESSAGES},
}
_MAGIC_KINDS = {MAGIC: ModelUpdate.kind, GLOBAL_MAGIC: GlobalModel.kind, TENSOR_MAGIC: Activations.kind}


def encode(message: Any) -> bytes:
    """The bytes of any message with a registered ``kind``."""
    kind = getattr(message, "kind", None)
    if kind not in CODECS:
        raise UpdateError(f"no codec for message kind {kind!r} ({type(message).__name__}); known: {sorted(CODECS)}.")
    return CODECS[kind][0](message)


def decode(data: bytes, expect: Expected | ShapeExpect | None = None) -> Any:
    """The message in untrusted ``data``, by the kind its magic names (``UpdateError`` on anything else; every tensor
    message kind shares one magic and names its kind in the header)."""
    kind = _MAGIC_KINDS.get(bytes(data[:4]))
    if kind is None:
        raise UpdateError(f"malformed message: it starts with {bytes(data[:4])!r}, no known message kind.")
    tensor_kind = kind in TENSOR_MESSAGES
    if expect is not None and isinstance(expect, ShapeExpect) != tensor_kind:  # the sender picks the magic
        wanted = expect.kind if isinstance(expect, ShapeExpect) else "an update or a global model"
        raise UpdateError(f"malformed message: it is {'a tensor message' if tensor_kind else f'a {kind}'}, the "
                          f"receiver expects {wanted}.")  # fmt: skip
    return CODECS[kind][1](data, expect)
