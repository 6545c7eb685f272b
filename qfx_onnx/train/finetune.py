"""Quantization-aware finetuning that learns the weights and the binary point of every tensor (QFX).

:func:`finetune` trains a :class:`~qfx_onnx.quant.quantize.FixedPointModel` in place: the float
master weights and, per quantizer, the ``frac`` parameter whose rounding is the tensor's binary
point. Total widths never change here (see :mod:`qfx_onnx.train.prepare` to change them, go per
channel or make weights K-hot first). A cast whose type an imported quantizer fixed (QONNX, QDQ;
``CastSite.imported``, annotated ``qfx.imported``) keeps its binary point unless
``config.recalibrate_imported``; its weights still train.

Model selection never looks at the test data. Every epoch the model is evaluated on a
**validation** set with the exact float64 fixed-point forward pass: the ``val`` data given, or else
``config.val_fraction`` of the training data carved out before training (seeded by
``config.seed``, stratified by class when the targets are class labels; see
:func:`qfx_onnx.train.batches.carve_validation`). The best validation epoch (epoch 0 being the
model as given) is returned, with its parameters replaced by their exact fixed-point values, and
``config.patience`` stops on the validation metric too. With ``val_fraction=0`` and no ``val``
there is no selection: the last epoch is returned. The test data (``eval``) is evaluated once,
on the returned model, after training: ``FinetuneResult.final``.

Training runs the graph in ``config.train_dtype`` (float32 by default: every cast is still exact
for W <= 24, only the sums of products inside convolutions round, and a step is faster than in
float64, see ``benchmarks/qat_results.md``); evaluation, best-model selection and the returned
model use float64.

Under ``torchrun --nproc-per-node N`` each rank trains on its shard of every global batch with
DistributedDataParallel; the loss of a rank is ``sum(losses of its shard) * N / global batch`` so
that DDP's gradient average equals the single-process gradient of the global-batch mean, and the
binary-point gradient of every activation cast (whose LSQ scale depends on the number of elements
it sees) is rescaled by ``sqrt(local / global batch)`` to match as well.

The model is also a plain ``nn.Module`` for your own loop::

    import torch, torch.nn.functional as F
    from qfx_onnx.quant.annotated import read_annotated, write_annotated

    model = read_annotated("cnn.qfx.onnx").float()      # casts stay exact in float32 (W <= 24)
    fracs = [p for n, p in model.named_parameters() if n.endswith(".frac")]   # binary points
    weights = [p for n, p in model.named_parameters() if not n.endswith(".frac")]
    opt = torch.optim.Adam([{"params": weights}, {"params": fracs, "lr": 0.1}], lr=1e-3)
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    model.double().eval()                               # the exact fixed-point forward pass
    write_annotated(model, "cnn.ft.qfx.onnx")
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from qfx_onnx.errors import QfxError
from qfx_onnx.fixed.quantizer import BinaryPointQuantizer
from qfx_onnx.fxcopy import copy_module, load_state
from qfx_onnx.quant.nonlinear_specs import refresh_nonlinear
from qfx_onnx.quant.quantize import FixedPointModel, align_bias_fracs
from qfx_onnx.train import checkpoint as ckpt
from qfx_onnx.train import distributed as dist_util
from qfx_onnx.train.batches import Batch, ShardedBatches, carve_validation, split_item
from qfx_onnx.train.metrics import better, evaluate, loss_sum
from qfx_onnx.train.prepare import (
    activation_quantizers, bake_parameters, describe, set_binary_points_learnable, weight_decay_params,
)

log = logging.getLogger(__name__)

TASKS = ("classification", "regression")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "none")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FinetuneInterrupted(QfxError):
    """Training was interrupted (Ctrl-C); ``checkpoint`` holds everything needed to resume."""

    exit_code = 130

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class FinetuneConfig:
    """Settings of one finetuning run (the CLI flags of ``qfx-onnx finetune``).

    ``batch_size`` is the global batch (split across ranks). ``frac_lr`` is the learning rate of
    the binary points (default ``frac_lr_scale * lr``: with Adam a step moves a binary point by
    about the learning rate, and it must travel 0.5 to change the type). ``val_fraction``: the
    share of the training data set aside (seeded by ``seed``, stratified by class) to select the
    best epoch on, when no validation data is given; 0: no validation, the last epoch is kept.
    ``patience``: stop after that many epochs without improvement of the validation metric
    (accuracy, or the loss for regression). ``checkpoint_dir`` None: no checkpoints.
    ``recalibrate_imported``: learn the binary points of imported types too (they lose their
    ``imported`` mark); by default they stay as given. ``compile``: run the training step's model
    under ``torch.compile`` (the casts of saturating float-path types trace with their binary
    points as tensors, so moving one does not recompile); the values equal eager training's up to
    the float rounding of fused gradient sums.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    frac_lr: float | None = None
    frac_lr_scale: float = 30.0
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    task: str = "classification"
    learn_binary_points: bool = True
    recalibrate_imported: bool = False
    seed: int = 0
    val_fraction: float = 0.1
    patience: int | None = None
    device: str = "cpu"
    train_dtype: str = "float32"
    eval_batch_size: int = 512
    checkpoint_dir: str | None = None
    resume: bool = False
    num_workers: int = 0
    compile: bool = False

    def check(self) -> None:
        """QfxError for any setting out of range."""
        if self.epochs < 0:
            raise QfxError(f"--epochs {self.epochs}: must be >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise QfxError(f"--batch-size {self.batch_size}: must be >= 1")
        for name in ("lr", "frac_lr", "weight_decay", "momentum"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise QfxError(f"--{name.replace('_', '-')} {value}: must be a finite number >= 0")
        for name, value, allowed in (("task", self.task, TASKS), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("lr-schedule", self.lr_schedule, SCHEDULES), ("train-dtype", self.train_dtype, tuple(DTYPES))):
            if value not in allowed:
                raise QfxError(f"--{name} {value!r}: choose one of {', '.join(allowed)}")
        if not (math.isfinite(self.val_fraction) and 0.0 <= self.val_fraction < 1.0):
            raise QfxError(f"--val-fraction {self.val_fraction}: must be >= 0 and < 1 (0: no validation, keep the last epoch)")
        if self.patience is not None and self.patience < 1:
            raise QfxError(f"--patience {self.patience}: must be >= 1")
        if self.resume and not self.checkpoint_dir:
            raise QfxError("--resume needs a checkpoint directory")

    @property
    def binary_point_lr(self) -> float:
        return self.frac_lr if self.frac_lr is not None else self.frac_lr_scale * self.lr

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it."""
        skip = {"device", "resume", "checkpoint_dir", "eval_batch_size", "num_workers", "patience", "compile"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class FinetuneResult:
    """What :func:`finetune` did. ``model`` is the finetuned model (the one passed in, now holding
    the selected epoch's exact fixed-point parameters and binary points). ``history`` has one
    record per epoch (epoch 0: before training) with the validation metrics ``val_loss`` (and
    ``val_accuracy``) when there is validation data. ``best_epoch`` is the epoch selected on
    validation (the last epoch without validation); ``validation`` its validation metrics and
    ``initial`` those of the model as given (None without validation). ``final`` are the exact
    float64 metrics of the returned model on the test data, evaluated once after selection (None
    without test data). ``split`` says how validation data was found: ``kind`` "carved" (from
    the training data), "given" or "none", ``train_samples``, ``val_samples``, ``stratified``.
    ``binary_points`` maps each tensor to its integer fractional bits (per channel) before and
    after."""

    model: FixedPointModel
    history: list[dict[str, Any]]
    best_epoch: int
    final: dict[str, float] | None
    initial: dict[str, float] | None
    epochs_run: int
    stopped_early: bool
    checkpoint: Path | None
    binary_points: dict[str, tuple[list[int], list[int]]]
    validation: dict[str, float] | None = None
    split: dict[str, Any] | None = None
    rank: int = 0
    world: int = 1
    seconds: float = 0.0

    def moved_binary_points(self) -> dict[str, tuple[list[int], list[int]]]:
        return {k: v for k, v in self.binary_points.items() if v[0] != v[1]}


class Callback:
    """Hooks the loop calls (on every rank); override what you need."""

    def on_start(self, info: dict[str, Any]) -> None:
        """``info``: epochs, steps_per_epoch, start_epoch, start_step, initial (metrics or None)."""

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        """After optimizer step ``step`` (1-based) of ``epoch`` (1-based) with this rank's mean loss."""

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        """After each epoch's evaluation and checkpoint; ``record`` is its history entry."""


# ------------------------------------------------------------------------------------ setup
def _optimizer(model: FixedPointModel, config: FinetuneConfig) -> torch.optim.Optimizer:
    decay_names = weight_decay_params(model)
    fracs = {id(m.frac) for m in model.modules() if isinstance(m, BinaryPointQuantizer)}
    decay, plain, frac = [], [], []
    for name, p in model.graph_module.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in fracs:
            frac.append(p)
        elif name in decay_names:
            decay.append(p)
        else:
            plain.append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
              {"params": plain, "weight_decay": 0.0, "lr": config.lr},
              {"params": frac, "weight_decay": 0.0, "lr": config.binary_point_lr}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise QfxError("the model has nothing to train (no parameters and every binary point frozen)")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr)


def _freeze_imported(model: FixedPointModel, recalibrate: bool) -> None:
    """Imported types keep their binary points; with ``recalibrate`` they learn them like any
    other and are no longer marked imported."""
    gm = model.graph_module
    for node in gm.graph.nodes:
        site = node.meta.get("qfx_site") if node.op == "call_module" else None
        if site is None or not site.imported:
            continue
        if recalibrate:
            site.imported = False
        else:
            gm.get_submodule(node.target).frac.requires_grad_(False)


def _schedule(config: FinetuneConfig, steps_per_epoch: int):
    total = max(config.epochs * steps_per_epoch, 1)
    if config.lr_schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if config.lr_schedule == "step":
        milestones = (total // 2, (3 * total) // 4)
        return lambda step: 0.1 ** sum(step >= m for m in milestones)
    return lambda step: 1.0


def _state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _int_fracs(model: FixedPointModel) -> dict[str, list[int]]:
    return {name: q.int_fracs() for name, q in model.quantizers().items()}


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _aligned(model: FixedPointModel) -> FixedPointModel:
    """A copy of ``model`` with every bias aligned to its layer's product LSB, as the returned
    model will be: learned binary points of inputs and weights move that LSB, and evaluating the
    aligned copy makes the metrics of the selected epoch those of the returned model."""
    copy_ = copy_module(model)
    align_bias_fracs(copy_)
    return copy_.to(next(model.parameters()).device, torch.float64)


class _StopFlag:
    """SIGINT sets a flag that the loop checks between steps (a second Ctrl-C interrupts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------------- loop
def finetune(model: FixedPointModel, train: Dataset | DataLoader, eval: Dataset | DataLoader | None = None,
             config: FinetuneConfig | None = None, *, val: Dataset | DataLoader | None = None,
             callbacks: Sequence[Callback] = ()) -> FinetuneResult:
    """Finetune ``model`` in place on ``train``, select the best epoch on validation data, and
    evaluate the selected model once on the test data ``eval`` (see module doc).

    ``train``/``val``/``eval`` are map-style Datasets of ``(x, y)`` items (then batching, shuffling
    and sharding across ranks are done here, deterministically from ``config.seed``) or
    DataLoaders (used as they are, one per rank). Without ``val``, ``config.val_fraction`` of a
    map-style ``train`` becomes the validation set (a DataLoader cannot be split: pass ``val`` or
    ``val_fraction=0``); with ``val_fraction=0`` the last epoch is returned. ``eval`` never
    influences training or selection: it is evaluated once, at the end, into ``final``.
    Guarantees: the same seed and data give the same split and identical weights and binary
    points; a run resumed from its checkpoint ends exactly where the uninterrupted run would (the
    split is part of the checkpoint's fingerprint); the returned model's parameters are exact
    fixed-point values and all metrics come from the exact float64 pass. Raises
    FinetuneInterrupted (exit code 130) after saving a checkpoint on Ctrl-C, and QfxError for
    bad settings or data.
    """
    config = config or FinetuneConfig()
    config.check()
    if not isinstance(model, FixedPointModel):
        raise QfxError(f"finetune expects a FixedPointModel, not {type(model).__name__}")
    ctx = dist_util.setup(config.device)
    try:
        return _Run(model, train, val, eval, config, ctx, list(callbacks)).run()
    finally:
        dist_util.teardown(ctx)


class _Run:
    def __init__(self, model: FixedPointModel, train, val_data, test_data, config: FinetuneConfig,
                 ctx: dist_util.DistContext, callbacks: list[Callback]) -> None:
        self.model, self.test_data, self.cfg, self.ctx, self.callbacks = model, test_data, config, ctx, callbacks
        self.device = ctx.device
        self.home = next(model.parameters()).device
        train, self.val_data, self.split = _validation(train, val_data, config)
        if isinstance(train, DataLoader):
            self.loader, self.batches = train, None
            self.steps_per_epoch = len(train)
        else:
            self.loader = None
            self.batches = ShardedBatches(train, config.batch_size, config.seed, ctx.rank, ctx.world,
                                          num_workers=config.num_workers)
            self.steps_per_epoch = len(self.batches)
        self.frac_factor = 1.0
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.loss_sum, self.loss_count = 0.0, 0.0
        self.best: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.bad_epochs, self.stopped_early = 0, False
        self.checkpoint = Path(ckpt.checkpoint_path(config.checkpoint_dir)) if config.checkpoint_dir else None

    # ---------------------------------------------------------------------------------- set up
    def _build(self) -> None:
        cfg = self.cfg
        self.model.to(self.device, torch.float64)
        set_binary_points_learnable(self.model, cfg.learn_binary_points)
        _freeze_imported(self.model, cfg.recalibrate_imported)
        # biases narrower than their layer's product LSB from the start (see _aligned)
        align_bias_fracs(self.model)
        self.model.to(self.device, torch.float64)
        refresh_nonlinear(self.model)  # the nonlinear ops' tables for the types training starts from
        self.fingerprint = {**cfg.fingerprint(), "model": _state_hash(self.model),
                            "structure": hashlib.sha256(repr(describe(self.model)).encode()).hexdigest()[:16],
                            "train_samples": self.batches.n if self.batches else None,
                            "steps_per_epoch": self.steps_per_epoch, "split": self.split["fingerprint"]}
        self.net = copy_module(self.model).to(DTYPES[cfg.train_dtype])
        self.net.train()
        if self.ctx.active:
            for name in activation_quantizers(self.net):
                frac = self.net.graph_module.get_submodule(name).frac
                if frac.requires_grad:
                    frac.register_hook(lambda g: g * self.frac_factor)
            ids = [self.device] if self.device.type == "cuda" else None
            self.ddp: nn.Module = DistributedDataParallel(self.net, device_ids=ids)
        else:
            self.ddp = self.net
        if cfg.compile:
            # the training step's forward and backward through inductor (casts fused with their
            # neighbours); the module keeps its parameters, so checkpoints and evaluation are unchanged
            self.ddp = torch.compile(self.ddp)
        self.opt = _optimizer(self.net, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg, self.steps_per_epoch))

    def _seed(self) -> None:
        seed = self.cfg.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))

    # ------------------------------------------------------------------------------ checkpoint
    def _save(self) -> Path | None:
        if self.checkpoint is None or not self.ctx.is_main:
            return self.checkpoint
        state = {"fingerprint": self.fingerprint, "epoch": self.epoch, "step": self.step,
                 "global_step": self.global_step, "model": self.net.state_dict(),
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "rng": ckpt.rng_state(), "best": self.best, "history": self.history,
                 "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
                 "partial": {"loss_sum": self.loss_sum, "count": self.loss_count}}
        return ckpt.save(state, self.checkpoint)

    def _restore(self) -> None:
        state = ckpt.load(self.checkpoint)
        ckpt.check_fingerprint(state, self.fingerprint, self.checkpoint)
        try:
            load_state(self.net, state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"{self.checkpoint}: does not fit this model ({' '.join(str(exc).split())[:200]})") from None
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.best = state["best"]
        if self.best is not None:
            self.best["state"] = {k: v.to(self.device) for k, v in self.best["state"].items()}
        self.history, self.bad_epochs = state["history"], state["bad_epochs"]
        self.stopped_early = state["stopped_early"]
        self.loss_sum, self.loss_count = state["partial"]["loss_sum"], state["partial"]["count"]

    # ------------------------------------------------------------------------------ evaluation
    def _validate(self) -> dict[str, float] | None:
        """The validation metrics of the current weights (as they would be returned); the test
        data is never looked at here."""
        if self.val_data is None:
            return None
        load_state(self.model, self.net.state_dict())
        return evaluate(_aligned(self.model), self.val_data, self.cfg.task, batch_size=self.cfg.eval_batch_size,
                        device=self.device, ctx=self.ctx)

    def _record(self, epoch: int, metrics: dict[str, float] | None, train_loss: float | None, seconds: float) -> dict:
        record = {"epoch": epoch, "train_loss": train_loss, "lr": self.opt.param_groups[0]["lr"], "seconds": seconds}
        if metrics is not None:
            record.update({f"val_{k}": v for k, v in metrics.items() if k != "count"})
        improved = metrics is None or better(metrics, self.best["metrics"] if self.best else None, self.cfg.task)
        if improved:
            self.best = {"epoch": epoch, "metrics": metrics, "state": _clone_state(self.net)}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        record["best"] = improved
        self.history.append(record)
        return record

    # ---------------------------------------------------------------------------------- train
    def _batches(self, epoch: int, start: int):
        if self.batches is not None:
            yield from self.batches.epoch(epoch, start)
            return
        for i, item in enumerate(self.loader):
            if i < start:
                continue
            x, y = split_item(item)
            size = len(x)
            total = int(dist_util.all_sum(self.ctx, [float(size)])[0])
            yield Batch(x, y, size, total)

    def _train_step(self, batch: Batch) -> float:
        if batch.y is None:
            raise QfxError("training data has no targets (y)")
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        self.frac_factor = math.sqrt(batch.size / batch.global_size) if batch.size else 0.0
        out = self.ddp(x)
        total = loss_sum(out, y, self.cfg.task)
        if batch.size == 0:
            total = total * 0.0  # a placeholder sample: take part in DDP's all-reduce, add nothing
        loss = total * (self.ctx.world / batch.global_size)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        value = float(total.detach())
        if not math.isfinite(value):
            raise QfxError(f"the training loss became {value} at epoch {self.epoch + 1}, step {self.step + 1}; "
                           "lower --lr or --frac-lr")
        return value

    def _interrupted(self) -> FinetuneInterrupted:
        path = self._save()
        where = f"epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}"
        if path is None:
            return FinetuneInterrupted(f"interrupted at {where}; no checkpoint directory, progress is lost", None)
        return FinetuneInterrupted(f"interrupted at {where}; checkpoint saved to {path} (continue with --resume)", path)

    def run(self) -> FinetuneResult:
        start_time = time.perf_counter()
        self._seed()
        self._build()
        before = _int_fracs(self.model)
        if self.cfg.resume:
            self._restore()
        else:
            self._record(0, self._validate(), None, 0.0)
            self._save()
        initial = self.history[0] if self.history else None
        info = {"epochs": self.cfg.epochs, "steps_per_epoch": self.steps_per_epoch, "start_epoch": self.epoch,
                "start_step": self.step, "initial": initial}
        for cb in self.callbacks:
            cb.on_start(info)
        with _StopFlag() as flag:
            try:
                self._loop(flag)
            except KeyboardInterrupt:
                raise self._interrupted() from None
        return self._finish(before, initial, time.perf_counter() - start_time)

    def _loop(self, flag: _StopFlag) -> None:
        cfg = self.cfg
        while self.epoch < cfg.epochs and not self.stopped_early:
            t0 = time.perf_counter()
            for batch in self._batches(self.epoch, self.step):
                value = self._train_step(batch)
                self.step += 1
                self.global_step += 1
                self.loss_sum += value
                self.loss_count += batch.size
                for cb in self.callbacks:
                    cb.on_step(self.epoch + 1, self.step, value / max(batch.size, 1))
                if dist_util.any_rank(self.ctx, flag.requested):
                    raise KeyboardInterrupt
            epoch_loss, count = dist_util.all_sum(self.ctx, [self.loss_sum, self.loss_count])
            metrics = self._validate()
            self.epoch, self.step = self.epoch + 1, 0
            self.loss_sum, self.loss_count = 0.0, 0.0
            record = self._record(self.epoch, metrics, epoch_loss / max(count, 1), time.perf_counter() - t0)
            if cfg.patience is not None and self.bad_epochs >= cfg.patience:
                self.stopped_early = True
            self._save()
            for cb in self.callbacks:
                cb.on_epoch_end(record)

    def _finish(self, before: dict[str, list[int]], initial: dict | None, seconds: float) -> FinetuneResult:
        best = self.best
        load_state(self.model, best["state"] if best else self.net.state_dict())
        align_bias_fracs(self.model)
        self.model.to(self.device, torch.float64)
        bake_parameters(self.model)
        refresh_nonlinear(self.model)  # tables for the learned types (exact either way; this keeps them accurate)
        final = self._test_once()
        after = _int_fracs(self.model)
        self.model.to(self.home)
        split = {k: v for k, v in self.split.items() if k != "fingerprint"}
        return FinetuneResult(
            model=self.model, history=self.history, best_epoch=best["epoch"] if best else self.epoch, final=final,
            initial={k[4:]: v for k, v in initial.items() if k.startswith("val_")} if initial and self.val_data is not None else None,
            epochs_run=self.epoch, stopped_early=self.stopped_early, checkpoint=self.checkpoint,
            binary_points={k: (before[k], after.get(k, before[k])) for k in before},
            validation=best["metrics"] if best and self.val_data is not None else None, split=split,
            rank=self.ctx.rank, world=self.ctx.world, seconds=seconds)

    def _test_once(self) -> dict[str, float] | None:
        """The test metrics of the returned model: the only time the test data is read."""
        if self.test_data is None:
            return None
        return evaluate(self.model, self.test_data, self.cfg.task, batch_size=self.cfg.eval_batch_size,
                        device=self.device, ctx=self.ctx)


def _validation(train, val, config: FinetuneConfig) -> tuple[Any, Any, dict[str, Any]]:
    """``(train, val, split)``: the training data (without the rows carved out for validation),
    the validation data (None: no selection) and a description of the split whose
    ``fingerprint`` entry identifies it in checkpoints."""
    info: dict[str, Any] = {"kind": "none", "val_samples": 0, "stratified": False, "val_fraction": config.val_fraction}
    if val is not None:
        info.update(kind="given", val_samples=_length(val), fingerprint=f"given:{_length(val)}")
    elif config.val_fraction > 0:
        if isinstance(train, DataLoader):
            raise QfxError("a DataLoader cannot be split into training and validation data: pass val=..., "
                           "or FinetuneConfig(val_fraction=0) to keep the last epoch without selection")
        carved = carve_validation(train, config.val_fraction, config.seed, stratify=config.task == "classification")
        train, val = carved.train, carved.val
        digest = hashlib.sha256(carved.val_idx.numpy().astype("<i8").tobytes()).hexdigest()[:16]
        info.update(kind="carved", val_samples=len(carved.val_idx), stratified=carved.stratified,
                    fingerprint=f"carved:{config.val_fraction}:{len(carved.train_idx)}+{len(carved.val_idx)}:{digest}")
    else:
        info["fingerprint"] = "none"
    if config.patience is not None and val is None:
        raise QfxError("--patience stops on the validation metric, and there is no validation data "
                       "(--val-fraction 0); give a validation fraction or drop --patience")
    info["train_samples"] = _length(train)
    return train, val, info


def _length(data) -> int | None:
    try:
        return len(data.dataset) if isinstance(data, DataLoader) else len(data)
    except TypeError:
        return None


__all__ = ["Callback", "FinetuneConfig", "FinetuneInterrupted", "FinetuneResult", "evaluate", "finetune"]
