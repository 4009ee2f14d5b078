"""Factor Transfer (Kim et al. 2018), REFERENCE §4.

A paraphraser (conv auto-encoder, rate k → k·C factor channels) is first trained alone on the
teacher's stage maps with an L1 reconstruction loss: rule ``train_paraphraser``, one per dataset ×
teacher × teacher seed, shared by every FT student of that teacher. The weights kept are those of
the epoch with the lowest validation reconstruction loss, and metrics.json says which epoch that
was. A translator (the same 3-conv encoder) on the student's stage is then trained together with
the student, with its own SGD and schedule:

    loss = β·D(N(translator(s)), N(encode(t))) + CE,   β = 500
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench import faults, io, models, provenance
from kdbench.data import load_dataset
from kdbench.errors import KdbenchError
from kdbench.methods import register
from kdbench.methods.base import FeatureMethod, Method
from kdbench.train import (
    TrainConfig,
    autocast,
    cpu_state_dict,
    file_sha256,
    fingerprint,
    load_state,
    make_loaders,
    make_schedule,
    make_sgd,
    make_step,
    nonfinite_batch,
    prepare,
    resolve_device,
    rng_state,
    set_rng_state,
    train_epoch,
)

log = logging.getLogger("kdbench")

PARAPHRASER_DEFAULTS: dict[str, Any] = {
    "epochs": 25,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
}


def _block(layers: list[nn.Module]) -> nn.Sequential:
    out: list[nn.Module] = []
    for layer in layers:
        out += [layer, nn.LeakyReLU(0.1)]
    return nn.Sequential(*out)


def encoder(channels: int, factors: int) -> nn.Sequential:
    """conv C→C, C→k·C, k·C→k·C (3×3, stride 1, pad 1, bias), LeakyReLU(0.1) after each."""
    return _block(
        [
            nn.Conv2d(channels, channels, 3, 1, 1),
            nn.Conv2d(channels, factors, 3, 1, 1),
            nn.Conv2d(factors, factors, 3, 1, 1),
        ]
    )


def n_factors(channels: int, rate: float) -> int:
    return max(1, int(round(channels * rate)))


class Paraphraser(nn.Module):
    """Encoder as :func:`encoder`; decoder of transposed convs k·C→k·C→C→C, no BN."""

    def __init__(self, channels: int = 64, rate: float = 0.5) -> None:
        super().__init__()
        f = n_factors(channels, rate)
        self.encoder = encoder(channels, f)
        self.decoder = _block(
            [
                nn.ConvTranspose2d(f, f, 3, 1, 1),
                nn.ConvTranspose2d(f, channels, 3, 1, 1),
                nn.ConvTranspose2d(channels, channels, 3, 1, 1),
            ]
        )

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


@register
class FT(FeatureMethod):
    name = "ft"
    defaults: ClassVar[dict[str, Any]] = {
        **FeatureMethod.defaults,
        "beta": 500.0,
        "rate": 0.5,
        "paraphraser": PARAPHRASER_DEFAULTS,
    }
    params_schema: ClassVar[dict[str, Any]] = {
        **FeatureMethod.params_schema,
        "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "paraphraser": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "epochs": {"type": "integer", "minimum": 1},
                "lr": {"type": "number", "exclusiveMinimum": 0},
                "momentum": {"type": "number", "minimum": 0, "maximum": 1},
                "weight_decay": {"type": "number", "minimum": 0},
            },
        },
    }
    #: files the workflow provides: the trained paraphraser of the student's teacher
    requires: ClassVar[tuple[str, ...]] = ("paraphraser",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "paraphraser" not in self.assets:
            raise KdbenchError("method 'ft' needs the teacher's trained paraphraser")
        channels = models.WIDTHS[int(self.params["stage"]) - 1]
        rate = float(self.params["rate"])
        self.translator = encoder(channels, n_factors(channels, rate))
        paraphraser = Paraphraser(channels, rate)
        what = f"paraphraser (stage {self.params['stage']}, rate {rate})"
        models.load_weights(paraphraser, self.assets["paraphraser"], what)
        paraphraser.eval().requires_grad_(False)
        self._paraphraser = [paraphraser]  # frozen: not a trainable submodule

    def to(self, *args: Any, **kwargs: Any) -> FT:  # type: ignore[override]
        super().to(*args, **kwargs)
        self._paraphraser[0] = self._paraphraser[0].to(*args, **kwargs)
        return self

    @classmethod
    def resolve_params(cls, params: dict[str, Any] | None) -> dict[str, Any]:
        resolved = super().resolve_params(params)
        resolved["paraphraser"] = {**PARAPHRASER_DEFAULTS, **(resolved.get("paraphraser") or {})}
        return resolved

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student, "translator": self.translator}

    @classmethod
    def expand_variants(cls, config: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """As the base; variants may change only ``beta`` and ``distance``, because every FT
        student of a teacher shares one paraphraser (trained with the block's stage and rate)."""
        for vname, overrides in ((config or {}).get("variants") or {}).items():
            fixed = sorted(set(overrides or {}) - {"beta", "distance"})
            if fixed:
                raise KdbenchError(
                    f"methods.ft.variants.{vname}: {', '.join(fixed)} cannot vary between FT "
                    "variants (they share one paraphraser); set it in the ft block"
                )
        return super().expand_variants(config)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        t, s, logits = self.stages(x)
        with torch.inference_mode():
            factor_t = self._paraphraser[0].encode(t)
        factor_s = self.translator(s)
        feature = self.feature_loss(factor_t.clone(), factor_s)
        return logits, {"ce": F.cross_entropy(logits, y), "feature": feature}


class Reconstruction(Method):
    """The paraphraser's own training as a method, so that the trainer's step runs it (the
    fast path: fused SGD, no host synchronisation inside an epoch, CUDA graphs): its
    "student" is the paraphraser, which reconstructs the teacher's stage maps; the loss is
    their mean L1 distance. Not registered: it is no distillation method."""

    name = "paraphraser"

    def __init__(self, paraphraser: Paraphraser, teacher: nn.Module, stage: int) -> None:
        super().__init__(paraphraser, teacher, {})
        self.stage = stage

    def features(self, x: Tensor) -> Tensor:
        """The teacher's stage map (fp32, no gradient)."""
        return self.teacher_outputs(x)[self.stage - 1].float()

    def forward_train(  # type: ignore[override]
        self, x: Tensor, y: Tensor
    ) -> tuple[None, dict[str, Tensor]]:
        t = self.features(x)
        return None, {"reconstruction": F.l1_loss(self.student(t).float(), t)}


def train_paraphraser(
    *,
    dataset: str,
    data: dict[str, Any],
    teacher: str,
    teacher_weights: str | Path,
    seed: int,
    params: dict[str, Any],
    train: dict[str, Any],
    outputs: dict[str, Any],
    state: str | Path,
) -> dict[str, Any]:
    """Train the paraphraser on the teacher's stage maps; write weights, metrics.json and
    Paraphraser_Loss.png to ``outputs`` (keys ``weights``, ``metrics``, ``loss_plot``).

    ``params`` are the ft method's parameters (``stage``, ``rate``, ``paraphraser`` recipe);
    ``train`` the student recipe (batch size, device, speed switches, …): its steps run as a
    student's do (:func:`kdbench.train.train_epoch`). Resumable like every training run.
    """
    params = FT.resolve_params(params)
    recipe = params["paraphraser"]
    cfg = TrainConfig.from_config(
        {**train, "epochs": recipe["epochs"], "schedule": "cosine", "eta_min": 0.0}
        | {k: recipe[k] for k in ("lr", "momentum", "weight_decay")}
    )
    stage = int(params["stage"])
    channels = models.WIDTHS[stage - 1]
    io.check_writable(state, *outputs.values())
    ds = load_dataset(dataset, **data).with_train_size(cfg.train_size)
    device = resolve_device(cfg.device)
    teacher_model = models.build(teacher, ds.num_classes, ds.in_channels)
    models.load_weights(teacher_model, teacher_weights, f"teacher {teacher}")
    torch.manual_seed(int(seed))
    net = Paraphraser(channels, float(params["rate"]))
    method = Reconstruction(net, teacher_model, stage)
    prepare(method, cfg, device)
    opt = make_sgd(net, cfg)
    sched = make_schedule(opt, cfg)
    optimizers = {"student": opt}
    step_fn = make_step(method, optimizers, device, cfg)
    train_loader, val_loader, _ = make_loaders(ds, cfg, device, int(seed))
    record = {
        "dataset": dataset,
        "data": data,
        "teacher": teacher,
        "teacher_sha256": file_sha256(teacher_weights),
        "params": params,
        "train": cfg.state_record(),
        "seed": int(seed),
    }
    fp = fingerprint(record)
    state_path = Path(state)
    epochs: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "val_loss": math.inf, "weights": None}
    io.remove_stale_temps(state_path, *outputs.values())
    saved = load_state(state_path, fp)
    if saved is not None:
        net.load_state_dict(saved["modules"]["paraphraser"])
        opt.load_state_dict(saved["optimizers"]["paraphraser"])
        sched.load_state_dict(saved["schedules"]["paraphraser"])
        set_rng_state(saved["rng"], device)
        epochs, best = list(saved["epochs"]), dict(saved["best"])
        log.info("resuming paraphraser after epoch %d/%d", len(epochs), cfg.epochs)

    doc: dict[str, Any] = {
        "status": "running",
        "run": {"role": "paraphraser", "dataset": dataset, "teacher": teacher, "seed": int(seed)},
        "config": record,
        "epochs": epochs,
        "provenance": provenance.collect(device),
    }
    skipped = sum(e.get("skipped_batches", 0) for e in epochs)
    with io.StateWriter() as states:  # each state written while the next epoch trains
        for epoch in range(len(epochs), cfg.epochs):
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            faults.phase(f"paraphraser-e{epoch + 1}")

            def on_bad_step(step: int, epoch: int = epoch) -> None:
                nonlocal skipped
                skipped += 1
                where = f"paraphraser dataset={dataset} teacher={teacher} seed={seed}"
                where += f" epoch {epoch + 1} step {step + 1}"
                nonfinite_batch(where, skipped, cfg.skip_nonfinite, len(epochs), state_path)

            totals = train_epoch(
                method, optimizers, train_loader, epoch, device, cfg, on_bad_step, step_fn
            )
            sched.step()
            net.eval()
            val_total = torch.zeros((), device=device)
            with torch.inference_mode():
                for xb, _ in val_loader.epoch():
                    with autocast(device, cfg):
                        t = method.features(xb)
                    val_total += F.l1_loss(net(t).float(), t, reduction="sum") / t[0].numel()
            entry = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": totals.parts.get("reconstruction", 0.0) / train_loader.num_samples,
                "val_loss": float(val_total) / len(val_loader.y),
                "epoch_seconds": time.perf_counter() - t0,
            }
            if totals.bad_steps:
                entry["skipped_batches"] = len(totals.bad_steps)
            if not all(math.isfinite(entry[k]) for k in ("train_loss", "val_loss")):
                raise KdbenchError(
                    f"paraphraser {dataset} {teacher}: non-finite loss at epoch {epoch + 1} "
                    f"(train {entry['train_loss']}, val {entry['val_loss']}); "
                    f"last good state kept in {state_path}"
                )
            epochs.append(entry)
            if entry["val_loss"] < best["val_loss"]:
                best = {"epoch": epoch + 1, "val_loss": entry["val_loss"]}
                best["weights"] = cpu_state_dict(net)
            states.save(
                state_path,
                {
                    "version": 1,
                    "fingerprint": fp,
                    "modules": {"paraphraser": net.state_dict()},
                    "optimizers": {"paraphraser": opt.state_dict()},
                    "schedules": {"paraphraser": sched.state_dict()},
                    "rng": rng_state(device),
                    "epochs": epochs,
                    "best": best,
                },
                then_json=[(outputs["metrics"], doc)],
            )
            log.info(
                "paraphraser epoch %d/%d reconstruction L1 train %.5f val %.5f %.1fs",
                epoch + 1,
                cfg.epochs,
                entry["train_loss"],
                entry["val_loss"],
                entry["epoch_seconds"],
            )
    faults.phase("paraphraser-final")
    doc["final"] = {
        "selected_epoch": best["epoch"],
        "selected_by": "lowest validation reconstruction L1",
        "val_loss": best["val_loss"],
        "epochs": len(epochs),
    }
    io.save_torch(outputs["weights"], best["weights"])
    title = f"{dataset} {teacher} seed {seed}"
    paraphraser_plot(epochs, best["epoch"], outputs["loss_plot"], title)
    doc["status"] = "complete"
    io.write_json(outputs["metrics"], doc)
    io.remove_state(state_path)
    return doc


def paraphraser_plot(
    epochs: list[dict[str, Any]], best_epoch: int, path: str | Path, title: str
) -> None:
    """Paraphraser_Loss.png: reconstruction L1 per epoch (train dotted, validation solid)."""
    from kdbench import plots  # matplotlib: only where a plot is drawn

    fig, ax = plots.plt.subplots(figsize=(7, 4.5))
    x = [e["epoch"] for e in epochs]
    marker = plots.line_marker(len(x))
    ax.plot(x, [e["train_loss"] for e in epochs], ":", marker=marker, label="train")
    ax.plot(x, [e["val_loss"] for e in epochs], "-", marker=marker, label="validation")
    ax.axvline(best_epoch, color="grey", lw=0.8)
    ax.set(xlabel="epoch", ylabel="reconstruction L1", title=f"paraphraser: {title}")
    plots.epoch_axis(ax, len(x))
    plots.log_y_axis(ax)
    ax.legend()
    plots.save(fig, path)
