"""Position blocks of sparse updates: which coordinates of a tensor are shared, in the smallest of four encodings
(int32 indices, a bitmap, a deflated bitmap, or Golomb-Rice coded gaps). Used by :mod:`monai_fedpriv.fl.codec`,
whose docstring gives the sizes."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.wire import inflate

__all__ = ["decode_positions", "encode_positions"]


def _rice_encode(mask: np.ndarray) -> bytes:
    """Gaps between shared indices, Golomb-Rice coded (parameter ``k`` chosen to minimise the size).

    Layout: ``k`` (1 byte) | unary stream length in bytes (uint32) | unary quotients | ``k``-bit remainders. The
    quotient ``(gap - 1) >> k`` is written as that many 1-bits and a 0-bit; streams are packed LSB first.
    """
    idx = np.flatnonzero(mask).astype(np.int64)
    gaps = np.diff(idx, prepend=-1) - 1  # >= 0
    costs = [int((gaps >> k).sum()) + gaps.size * (1 + k) for k in range(32)]
    k = int(np.argmin(costs))
    quot = gaps >> k
    ends = np.cumsum(quot + 1) - 1  # position of each terminating 0-bit
    unary = np.ones(int(ends[-1]) + 1 if gaps.size else 0, dtype=np.uint8)
    unary[ends] = 0
    unary_bytes = np.packbits(unary, bitorder="little").tobytes()
    rem = ((gaps[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    return struct.pack("<BI", k, len(unary_bytes)) + unary_bytes + np.packbits(rem, bitorder="little").tobytes()


_CHUNK = 2**17  # unary bytes decoded at a time: temporaries stay small whatever the block holds


def _rice_decode(block: bytes, count: int, numel: int, key: str) -> np.ndarray:
    """The flat mask from a Golomb-Rice gap block, decoded chunk by chunk into the one ``numel`` mask: the block
    must hold exactly ``count`` gaps that stay inside the tensor, and no byte more."""
    bad = f"corrupt gap block for tensor {key!r}"
    if len(block) < 5:
        raise UpdateError(f"{bad}: {len(block)} bytes.")
    k, n_unary = struct.unpack_from("<BI", block, 0)
    if k > 31 or n_unary > len(block) - 5 or len(block) - 5 - n_unary != (count * k + 7) // 8:
        raise UpdateError(f"{bad}: k = {k}, {n_unary} unary bytes do not fit {count} gaps in {len(block)} bytes.")
    unary = np.frombuffer(block, dtype=np.uint8, count=n_unary, offset=5)
    rem_bytes = np.frombuffer(block, dtype=np.uint8, offset=5 + n_unary)
    weights = 1 << np.arange(k - 1, -1, -1, dtype=np.int64)
    mask = np.zeros(numel, dtype=bool)
    done, last_end, last_idx = 0, -1, -1
    for start in range(0, n_unary, _CHUNK):
        if done == count:
            break
        bits = np.unpackbits(unary[start : start + _CHUNK], bitorder="little")
        ends = np.flatnonzero(bits == 0)[: count - done] + 8 * start
        if ends.size == 0:
            continue
        gaps = (np.diff(ends, prepend=last_end) - 1) << k
        if k:
            b0, b1 = done * k, (done + ends.size) * k
            rem_bits = np.unpackbits(rem_bytes[b0 // 8 : (b1 + 7) // 8], bitorder="little")[b0 % 8 : b0 % 8 + b1 - b0]
            gaps += rem_bits.reshape(-1, k).astype(np.int64) @ weights
        if int(gaps.max()) >= numel:  # checked before the sum: no overflow
            raise UpdateError(f"{bad}: a gap passes the {numel} elements of the tensor.")
        idx = np.cumsum(gaps + 1) + last_idx
        if int(idx[-1]) >= numel:
            raise UpdateError(f"{bad}: an index passes the {numel} elements of the tensor.")
        mask[idx] = True
        done, last_end, last_idx = done + ends.size, int(ends[-1]), int(idx[-1])
    if done != count or n_unary != (last_end + 8) // 8:
        raise UpdateError(f"{bad}: {done} of {count} gaps in {n_unary} unary bytes.")
    return mask


def encode_positions(mask: np.ndarray) -> tuple[str, bytes]:
    """The smallest of the position encodings of a flat boolean mask."""
    if mask.size >= 2**31:
        raise UpdateError(f"tensor with {mask.size} elements is too large for int32 indices.")
    bitmap = np.packbits(mask, bitorder="little").tobytes()
    options = [
        ("indices", np.flatnonzero(mask).astype("<i4").tobytes()),
        ("bitmap", bitmap),
        ("bitmap_deflate", zlib.compress(bitmap, 9)),
        ("gaps_rice", _rice_encode(mask)),
    ]
    return min(options, key=lambda o: len(o[1]))  # first wins on ties


def decode_positions(encoding: str, block: bytes, numel: int, count: int, key: str) -> np.ndarray:
    """The flat boolean mask of ``numel`` coordinates (``count`` of them shared) from its position block.

    Nothing larger than the mask is ever produced: int32 indices must be exactly ``count`` and strictly increasing
    inside the tensor, a bitmap exactly the tensor's, a deflated bitmap inflates to at most that (bounded
    ``zlib.decompressobj``), a gap block is decoded chunk by chunk.

    Raises:
        UpdateError: naming the tensor, on any block that does not decode to ``count`` coordinates of the tensor.
    """
    if encoding == "indices":
        if len(block) != 4 * count:
            raise UpdateError(f"index block of tensor {key!r} has {len(block)} bytes, expected {4 * count}.")
        idx = np.frombuffer(block, dtype="<i4")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= numel or bool(np.any(idx[1:] <= idx[:-1]))):
            raise UpdateError(f"corrupt index block for tensor {key!r}.")
        mask = np.zeros(numel, dtype=bool)
        mask[idx] = True
        return mask
    if encoding == "gaps_rice":
        return _rice_decode(block, count, numel, key)
    if encoding not in ("bitmap", "bitmap_deflate"):
        raise UpdateError(f"unknown position encoding {encoding!r} for tensor {key!r}.")
    size = (numel + 7) // 8
    if encoding == "bitmap_deflate":
        block = inflate(block, size, f"compressed bitmap of tensor {key!r}")
    if len(block) != size:
        raise UpdateError(f"bitmap of tensor {key!r} has {len(block)} bytes, expected {size}.")
    return np.unpackbits(np.frombuffer(block, dtype=np.uint8), count=numel, bitorder="little").view(bool)
