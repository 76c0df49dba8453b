"""The secure-aggregation stages' messages as bytes, for transports between processes (NVIDIA FLARE tasks).

``MFSA`` + version + header length + a JSON header (kind, sender, session, round, the message's small fields) +
the payload (public keys, sealed packets, packed integers). Decoding treats the bytes as hostile: every length is
bounded before anything is allocated, the header's fields are typed, the sender and every named site belong to the
session, a masked vector has exactly the expected length and width and no value outside the ring, a share lies in
the field. Anything else is a ``ValueError`` naming the sender when it is known; nothing else escapes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from monai_fedpriv.secagg.messages import (
    Advert,
    MaskedInput,
    SharePackets,
    UnmaskRequest,
    UnmaskShares,
    packed_width,
)
from monai_fedpriv.secagg.session import Session
from monai_fedpriv.secagg.shamir import PRIME

__all__ = ["decode_message", "encode_message"]

MAGIC = b"MFSA"
VERSION = 1
MAX_HEADER = 1 << 20
MAX_PACKET = 1024
_PREFIX = struct.Struct("<4sBI")
_DTYPES = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}
_KINDS = {"advert": Advert, "shares": SharePackets, "masked": MaskedInput, "request": UnmaskRequest,
          "unmask": UnmaskShares}  # fmt: skip


def encode_message(message: Any, bits: int) -> bytes:
    """The bytes of one stage's message (``bits``: the session's ring)."""
    head: dict[str, Any] = {"session": message.session_id, "round": message.round}
    payload = b""
    if isinstance(message, Advert):
        head.update(kind="advert", site=message.site)
        payload = message.c_pk + message.s_pk
    elif isinstance(message, SharePackets):
        head.update(kind="shares", site=message.site, packets=[[v, len(p)] for v, p in message.packets.items()])
        payload = b"".join(message.packets.values())
    elif isinstance(message, MaskedInput):
        width = packed_width(bits)
        head.update(kind="masked", site=message.site, size=int(message.values.size), width=width)
        payload = np.asarray(message.values, dtype=np.uint64).astype(_DTYPES[width]).tobytes()
    elif isinstance(message, UnmaskRequest):
        head.update(kind="request", survivors=list(message.survivors), dropped=list(message.dropped))
    elif isinstance(message, UnmaskShares):
        head.update(kind="unmask", site=message.site, self_mask={k: str(v) for k, v in message.self_mask.items()},
                    keys={k: str(v) for k, v in message.keys.items()})  # fmt: skip
    else:
        raise TypeError(f"not a secure-aggregation message: {type(message).__name__}")
    header = json.dumps(head, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload


def _fail(who: str, why: str) -> ValueError:
    return ValueError(f"{who}: a malformed secure-aggregation message: {why}.")


def _site(value: Any, session: Session, who: str) -> str:
    if not isinstance(value, str) or value not in session.sites:
        raise _fail(who, f"{str(value)[:40]!r} is not a site of the round")
    return value


def _share(value: Any, who: str) -> int:
    if not isinstance(value, str) or not value.isdigit() or len(value) > 160 or int(value) >= PRIME:
        raise _fail(who, "a share outside the field")
    return int(value)


def decode_message(data: bytes, session: Session, kind: str, size: int | None = None) -> Any:
    """One stage's message of ``kind`` (``advert``, ``shares``, ``masked``, ``request``, ``unmask``) from untrusted
    ``data``, checked against the round's ``session`` (and, for a masked vector, its length ``size``).

    Raises:
        ValueError: anything malformed, of another kind, or outside the session.
    """
    who = "a site"
    try:
        if not isinstance(data, (bytes, bytearray)) or len(data) < _PREFIX.size:
            raise _fail(who, "too short")
        magic, version, length = _PREFIX.unpack_from(data)
        if magic != MAGIC or version != VERSION or length > min(MAX_HEADER, len(data) - _PREFIX.size):
            raise _fail(who, "bad magic, version or header length")
        head = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + length]))
        body = bytes(data[_PREFIX.size + length :])
        if not isinstance(head, dict):
            raise _fail(who, "the header is not an object")
        if kind != "request":
            who = _site(head.get("site"), session, who)
        if head.get("kind") != kind or head.get("session") != session.session_id or head.get("round") != session.round:
            raise _fail(who, f"not a {kind} message of this session and round (replayed, stale or misrouted)")
        return _build(kind, head, body, session, who, size)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the bytes do, it is a malformed message
        raise _fail(who, f"{type(exc).__name__}: {exc}"[:200]) from None


def _build(kind: str, head: dict, body: bytes, session: Session, who: str, size: int | None) -> Any:
    sid, rnd = session.session_id, session.round
    if kind == "advert":
        if len(body) != 64:
            raise _fail(who, "public keys of the wrong length")
        return Advert(who, sid, rnd, body[:32], body[32:])
    if kind == "shares":
        entries = head.get("packets")
        if not isinstance(entries, list) or len(entries) > len(session.sites):
            raise _fail(who, "too many share packets")
        packets, start = {}, 0
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int)
                    and 28 <= entry[1] <= MAX_PACKET):  # fmt: skip
                raise _fail(who, "a share packet of a bad length")
            receiver = _site(entry[0], session, who)
            if receiver in packets or receiver == who:
                raise _fail(who, "two packets for one site, or one for itself")
            packets[receiver], start = body[start : start + entry[1]], start + entry[1]
        if start != len(body):
            raise _fail(who, "packet lengths do not add up to the payload")
        return SharePackets(who, sid, rnd, packets)
    if kind == "masked":
        width = packed_width(session.bits)
        if head.get("size") != size or head.get("width") != width or len(body) != width * int(size or 0):
            raise _fail(who, f"a masked vector that is not {size} integers of {width} byte(s)")
        values = np.frombuffer(body, dtype=_DTYPES[width]).astype(np.uint64)
        if np.any(values >> np.uint64(session.bits)):
            raise _fail(who, f"values outside the ring of 2^{session.bits}")
        return MaskedInput(who, sid, rnd, values)
    if kind == "request":
        lists = [head.get("survivors"), head.get("dropped")]
        named: list[list[Any]] = [v for v in lists if isinstance(v, list) and len(v) <= len(session.sites)]
        if len(named) != 2:
            raise _fail("the server", "an unmask request without site lists")
        survivors = tuple(_site(v, session, "the server") for v in named[0])
        dropped = tuple(_site(v, session, "the server") for v in named[1])
        return UnmaskRequest(sid, rnd, survivors, dropped)
    if kind == "unmask":
        found = [head.get("self_mask"), head.get("keys")]
        maps: list[dict[Any, Any]] = [m for m in found if isinstance(m, dict) and len(m) <= len(session.sites)]
        if len(maps) != 2 or body:
            raise _fail(who, "unmask shares without their two maps")
        seeds = {_site(k, session, who): _share(v, who) for k, v in maps[0].items()}
        keys = {_site(k, session, who): _share(v, who) for k, v in maps[1].items()}
        return UnmaskShares(who, sid, rnd, seeds, keys)
    raise _fail(who, f"unknown kind {kind!r}")
