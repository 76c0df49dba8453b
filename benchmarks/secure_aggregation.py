"""Secure aggregation's cost on one 2M-parameter network (a MONAI UNet, 2,056,838 weights) for 3, 10 and 50 sites:
bytes each site sends and receives per round against the float32 dense update FedAvg sends, and seconds per round
beyond plain FedAvg (the codec round trip and the mean), with and without distributed DP.

    python benchmarks/secure_aggregation.py --sites 3,10,50 --json runs/bench/secure_aggregation.json

Seconds are measured in one process, one site after another: ``site_seconds`` is the slowest site's own work (its
encoding and its four stages, what a deployed site adds to its round), ``server_seconds`` the server's (routing,
summing, reconstructing secrets, removing masks, decoding). ``--neighbours-from N``: from N sites on, SecAgg+ with
``--neighbours`` (each site masks with k others instead of all).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monai_fedpriv.fl.codec import decode_update, encode_update
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.secagg.client import SecAggClient
from monai_fedpriv.secagg.ddp import DistributedDP
from monai_fedpriv.secagg.messages import wire_bytes
from monai_fedpriv.secagg.server import SecAggServer
from monai_fedpriv.secagg.session import Session, default_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import emit  # noqa: E402


def network_weights() -> dict[str, torch.Tensor]:
    from monai.networks.nets import UNet

    net = UNet(2, 1, 3, (18, 36, 72, 144, 288), (2, 2, 2, 2), num_res_units=2, norm="INSTANCE")
    return {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def plain_round(updates: dict[str, ModelUpdate]) -> tuple[float, int]:
    """FedAvg's round trip of the same updates: encode, decode, mean (seconds, bytes one site sends)."""
    t0 = time.perf_counter()
    decoded = [decode_update(encode_update(u)) for u in updates.values()]
    keys = list(decoded[0].delta)
    _ = {k: torch.stack([d.delta[k] for d in decoded]).mean(0) for k in keys}
    return time.perf_counter() - t0, len(encode_update(next(iter(updates.values()))))


def secure_round(vectors: dict[str, np.ndarray], bits: int, neighbours: int | None, noise: float) -> dict:
    sites = tuple(vectors)
    n, dim = len(sites), len(next(iter(vectors.values())))
    session = Session(secrets.token_hex(8), 1, sites, default_threshold(n, neighbours), bits, neighbours, 1)
    coding = DistributedDP(dim, 1.0, noise, bits, n, session.threshold, rotation_seed=3)
    site_time = {s: 0.0 for s in sites}
    site_time["server"] = 0.0
    sent = {s: 0 for s in sites}
    got = {s: 0 for s in sites}
    rng = np.random.default_rng(0)

    def timed(who: str, fn, *args):  # noqa: ANN001, ANN202 - one party's work, added to its seconds
        t0 = time.perf_counter()
        out = fn(*args)
        site_time[who] += time.perf_counter() - t0
        return out

    inputs = {s: timed(s, coding.encode, vectors[s], rng) for s in sites}
    clients = {s: SecAggClient(s, session) for s in sites}
    server = SecAggServer(session, coding.padded)
    adverts = [timed(s, clients[s].advertise) for s in sites]
    public = timed("server", server.collect_adverts, adverts)
    shares = [timed(s, clients[s].share_keys, public) for s in sites]
    routed = timed("server", server.route, shares)
    masked = [timed(s, clients[s].masked_input, routed[s], inputs[s]) for s in sites]
    request = timed("server", server.collect_inputs, masked)
    answers = [timed(s, clients[s].unmask, request) for s in sites]
    decoded = timed("server", lambda: coding.decode(server.unmask(answers)))
    server_time = site_time.pop("server")
    for message in [*adverts, *shares, *masked, *answers]:
        sent[message.site] += wire_bytes(message, bits)
    for s in sites:
        got[s] += sum(wire_bytes(a, bits) for a in public.values()) + sum(len(p) + 16 for p in routed[s].values())
        got[s] += wire_bytes(request, bits)
    error = decoded - sum(np.clip(1.0 / max(np.linalg.norm(v), 1e-12), None, 1.0) * v for v in vectors.values())
    return {"site_seconds": max(site_time.values()), "server_seconds": server_time,
            "bytes_sent_per_site": int(np.mean(list(sent.values()))),
            "bytes_received_per_site": int(np.mean(list(got.values()))),
            "threshold": session.threshold, "neighbours": neighbours, "padded_dim": coding.padded,
            "sum_error_rms": float(np.sqrt(np.mean(error**2)))}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", default="3,10,50")
    p.add_argument("--bits", type=int, default=16)
    p.add_argument("--neighbours", type=int, default=8)
    p.add_argument("--neighbours-from", type=int, default=50)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    weights = network_weights()
    dim = sum(v.numel() for v in weights.values())
    rows = []
    for n in (int(x) for x in args.sites.split(",")):
        rng = np.random.default_rng(n)
        deltas = {f"site-{i}": {k: torch.from_numpy(rng.normal(0, 1e-3, v.shape).astype(np.float32))
                                for k, v in weights.items()} for i in range(1, n + 1)}  # fmt: skip
        updates = {s: ModelUpdate(s, 1, d, n_samples=10, local_steps=10) for s, d in deltas.items()}
        plain_s, dense = plain_round(updates)
        vectors = {s: torch.cat([d[k].reshape(-1).double() for k in d]).numpy() for s, d in deltas.items()}
        k = args.neighbours if n >= args.neighbours_from else None
        secure = secure_round(vectors, args.bits, k, 0.0)
        ddp = secure_round(vectors, args.bits, k, args.noise_multiplier)
        rows.append({"sites": n, "dense_float32_bytes": dense, "plain_fedavg_seconds": plain_s,
                     "secure": secure, "secure_ddp": ddp,
                     "bytes_ratio": secure["bytes_sent_per_site"] / dense,
                     "extra_seconds_per_round": secure["site_seconds"] + secure["server_seconds"] - plain_s / n,
                     "extra_seconds_per_round_ddp": ddp["site_seconds"] + ddp["server_seconds"] - plain_s / n,
                     })  # fmt: skip
        print(f"{n} sites: bytes {rows[-1]['bytes_ratio']:.3f}x dense, site {secure['site_seconds']:.2f}s, server "
              f"{secure['server_seconds']:.2f}s (DDP: site {ddp['site_seconds']:.2f}s)", flush=True)
    emit({"benchmark": "secure_aggregation", "parameters": dim, "bits": args.bits, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
