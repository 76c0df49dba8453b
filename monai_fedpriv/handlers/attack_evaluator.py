"""Attack what a site actually sends: a pass-through update filter that runs gradient inversion at chosen rounds.

Placed *last* in :class:`~monai_fedpriv.handlers.FederatedSync`'s ``filters``, the evaluator sees the update after
DP-SGD and every privatizing filter, i.e. exactly what an honest-but-curious server receives. It returns the update
unchanged; at the rounds listed it inverts it (Eq. 1 of seed 004, :func:`monai_fedpriv.attacks.reconstruct`) and
writes ``round_<r>/attack.json`` and ``round_<r>/attack.png`` into ``output_dir``.

The server knows the global weights it sent. The evaluator snapshots them at the first *training* forward pass of
each round (after the site loaded the global model, before the first step), and takes the victim batch from the
first iteration of the round. The replay is exact when the round is one local step on one batch (the audit
setting); with several steps on different batches the attack replays ``K`` steps on the first batch, a lower bound.

Leakage gate (optional, ``gate_ssim``): run site-side, the evaluator can *drop* an attacked update whose
reconstruction beats both baselines and reaches ``gate_ssim``: the update is replaced by one with every coordinate
unshared (all-``False`` masks, zero delta), which the aggregator ignores. The gate only sees the rounds it attacks,
and the decision to drop depends on the data, so it is a safety net on top of DP, never a privacy guarantee.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_fedpriv.attacks.figures import save_reconstruction_grid
from monai_fedpriv.attacks.gradient_inversion import reconstruct
from monai_fedpriv.attacks.scores import label_map, score_reconstruction
from monai_fedpriv.attacks.threat_model import ThreatModel
from monai_fedpriv.attacks.victim import update_norm
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.filters.base import copy_update, meta_with_privacy, privacy_meta
from monai_fedpriv.privacy.grad_sample import plain_copy
from monai_fedpriv.utils.files import json_safe, write_json

__all__ = ["ReconstructionAttackEvaluator"]


class ReconstructionAttackEvaluator:
    """Update filter + Ignite handler that measures the leakage of the updates a site sends.

    Args:
        rounds: 1-based federated rounds to attack.
        output_dir: folder for ``round_<r>/attack.json`` and ``attack.png``.
        threat_model: attacker knowledge; ``batch_size`` and ``local_steps`` are taken from what is observed.
        model: the site's network (the module the trainer runs, or its Opacus wrapper; not modified).
        loss: the site's training loss.
        iterations: attack iterations.
        restarts: random restarts.
        tv_weight: total-variation weight of Eq. 1.
        seed: seed of the attack's initialisation (one generator per attacked round: ``seed + round``).
        image_key: batch key of the images.
        label_key: batch key of the label maps.
        num_threads: CPU threads during an attack (``None``: torch's setting; 1 is fastest on a busy CPU).
        gate_ssim: drop an attacked update whose reconstruction beats both baselines with SSIM >= this value
            (``None``: never drop; the evaluator is then a pure pass-through).

    Example:
        >>> evaluator = ReconstructionAttackEvaluator([1], "runs/attack", tm, net, loss)  # doctest: +SKIP
        >>> evaluator.attach(trainer)  # doctest: +SKIP
        >>> sync = FederatedSync(transport, "site-1", filters=[dp_filter, evaluator])  # doctest: +SKIP
    """

    def __init__(
        self,
        rounds: Iterable[int],
        output_dir: str | Path,
        threat_model: ThreatModel,
        model: torch.nn.Module,
        loss: torch.nn.Module,
        iterations: int = 1000,
        restarts: int = 4,
        tv_weight: float = 5e-2,
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        num_threads: int | None = None,
        gate_ssim: float | None = None,
    ) -> None:
        self.rounds = sorted({int(r) for r in rounds})
        if not self.rounds or self.rounds[0] < 1:
            raise ValueError(f"rounds must be non-empty 1-based round numbers, got {self.rounds}.")
        if iterations < 1 or restarts < 1:
            raise ValueError(f"iterations and restarts must be >= 1, got {iterations}, {restarts}.")
        if not isinstance(threat_model, ThreatModel):
            raise TypeError(f"threat_model should be a ThreatModel, got {type(threat_model).__name__}.")
        self.output_dir = Path(output_dir)
        self.threat_model = threat_model
        self.model = getattr(model, "_module", model)  # an Opacus GradSampleModule wraps the network
        self.loss = loss
        self.iterations = int(iterations)
        self.restarts = int(restarts)
        self.tv_weight = float(tv_weight)
        self.seed = int(seed)
        self.image_key = image_key
        self.label_key = label_key
        self.num_threads = num_threads
        if gate_ssim is not None and not (isinstance(gate_ssim, (int, float)) and 0.0 < gate_ssim <= 1.0):
            raise ValueError(f"gate_ssim should be None or a number in (0, 1], got {gate_ssim!r}.")
        self.gate_ssim = None if gate_ssim is None else float(gate_ssim)
        self.results: dict[int, dict[str, Any]] = {}
        self._global: dict[str, torch.Tensor] | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._armed = True
        self._hook = self.model.register_forward_pre_hook(self._snapshot)

    # -- observation ----------------------------------------------------------------------------------------------
    def _snapshot(self, module: torch.nn.Module, _args: Any) -> None:
        if self._armed and module.training and torch.is_grad_enabled():
            self._global = {n: p.detach().clone() for n, p in module.named_parameters()}
            self._armed = False

    def attach(self, engine: Engine) -> None:
        """Record the first batch of each round (call once on the trainer)."""
        if not engine.has_event_handler(self.observe_batch, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.observe_batch)

    def observe_batch(self, engine: Engine) -> None:
        """Keep the batch of the round's first iteration (images and label maps, on CPU)."""
        if self._batch is not None:
            return
        batch: Any = engine.state.batch
        if isinstance(batch, list) and batch and isinstance(batch[0], dict):  # MONAI decollated the batch
            batch = {
                k: torch.stack([torch.as_tensor(_plain(item[k])) for item in batch])
                for k in batch[0]
                if k in (self.image_key, self.label_key)
            }
        if isinstance(batch, dict):
            image, label = batch[self.image_key], batch[self.label_key]
        else:
            image, label = batch[0], batch[1]
        self._batch = (_plain(image), _plain(label))

    # -- filter ---------------------------------------------------------------------------------------------------
    def __call__(self, update: ModelUpdate) -> ModelUpdate:
        """Attack ``update`` if its round is listed; return a copy of it unless the leakage gate drops it (it never
        hands back its input object, as every filter of a :class:`~monai_fedpriv.privacy.filters.FilterChain`)."""
        try:
            if update.round in self.rounds:
                if self._global is None or self._batch is None:
                    raise RuntimeError(
                        f"round {update.round}: no global weights or batch were observed; attach the evaluator to "
                        "the trainer and put it in FederatedSync's filters."
                    )
                record = self.attack(update, self._global, *self._batch)
                self.results[update.round] = record
                if self._gate(record):
                    record["dropped"] = True
                    return _dropped(update, record)
        finally:
            self._armed, self._batch = True, None  # the next round starts from a new global model
        return copy_update(update)

    def _gate(self, record: dict[str, Any]) -> bool:
        if self.gate_ssim is None:
            return False
        leaks = [s["verdict"].startswith("leaks") and s["ssim"] >= self.gate_ssim for s in record["images"]]
        return any(leaks)

    def attack(
        self, update: ModelUpdate, global_weights: dict[str, torch.Tensor], image: torch.Tensor, label: torch.Tensor
    ) -> dict[str, Any]:
        """Invert one update against the batch it came from, write the outputs and return the JSON record."""
        device = next(self.model.parameters()).device
        self._hook.remove()  # keep the snapshot hook (and this evaluator) out of the server's copy
        try:
            server_model = plain_copy(self.model)  # nor a DP wrapper's per-sample hooks
        finally:
            self._hook = self.model.register_forward_pre_hook(self._snapshot)
        with torch.no_grad():
            for name, p in server_model.named_parameters():
                p.copy_(global_weights[name])
        tm = dataclasses.replace(
            self.threat_model,
            batch_size=int(image.shape[0]),
            local_steps=max(1, int(update.local_steps)),
            image_shape=tuple(image.shape[2:]),
            in_channels=int(image.shape[1]),
        )
        recon, stats = reconstruct(
            update, server_model, tm, self.loss, mask=label.to(device) if tm.mask_known else None,
            iterations=self.iterations, restarts=self.restarts, tv_weight=self.tv_weight,
            generator=torch.Generator().manual_seed(self.seed + update.round), num_threads=self.num_threads,
        )  # fmt: skip
        per_image = [score_reconstruction(recon[i], image[i], label_map(label[i]), tm.pixel_range)
                     for i in range(len(recon))]  # fmt: skip
        privacy = dict(update.meta.get("privacy", {}) or {})
        record = {
            "round": update.round,
            "site": update.site,
            "psnr": sum(s["psnr"] for s in per_image) / len(per_image),
            "ssim": sum(s["ssim"] for s in per_image) / len(per_image),
            "verdict": per_image[0]["verdict"] if len(per_image) == 1 else _batch_verdict(per_image),
            "images": per_image,
            "epsilon": privacy.get("epsilon"),
            "noise_multiplier": privacy.get("noise_multiplier", tm.noise_multiplier),
            "max_grad_norm": privacy.get("max_grad_norm", tm.max_grad_norm),
            "update_norm": update_norm(update.delta),
            "threat_model": tm.to_dict(),
            **{k: v for k, v in stats.items() if k != "mask"},
        }
        out = self.output_dir / f"round_{update.round}"
        out.mkdir(parents=True, exist_ok=True)
        rows = [(f"image {i}: SSIM {s['ssim']:.2f}", image[i], recon[i]) for i, s in enumerate(per_image)]
        save_reconstruction_grid(rows, out / "attack.png", tm.pixel_range)
        write_json(record, out / "attack.json")
        return record

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"results": {str(k): json_safe(v) for k, v in self.results.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "results" not in state:
            raise KeyError("ReconstructionAttackEvaluator state lacks 'results'.")
        self.results = {int(k): v for k, v in state["results"].items()}


def _dropped(update: ModelUpdate, record: dict[str, Any]) -> ModelUpdate:
    """``update`` with nothing shared (zero delta, all-``False`` masks): the aggregator ignores every coordinate."""
    privacy = privacy_meta(update)
    privacy["leakage_gate"] = {"dropped": True, "round": update.round, "ssim": record["ssim"]}
    privacy["fraction_shared"] = 0.0
    meta = meta_with_privacy(update, privacy)
    return dataclasses.replace(
        update,
        delta={k: torch.zeros_like(v) for k, v in update.delta.items()},
        masks={k: torch.zeros_like(v, dtype=torch.bool) for k, v in update.delta.items()},
        optimizer_state=None,
        meta=meta,
    )


def _plain(value: Any) -> torch.Tensor:
    """A detached CPU copy as a plain tensor (MONAI ``MetaTensor`` metadata dropped)."""
    tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return tensor.detach().cpu().clone()


def _batch_verdict(per_image: list[dict[str, Any]]) -> str:
    leaking = sum(s["verdict"].startswith("leaks") for s in per_image)
    return f"{leaking}/{len(per_image)} images leak (beat both baselines)"
