"""``qfx-onnx finetune``: quantization-aware training of an annotated model, binary points included."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from qfx_onnx.errors import DataError, OnnxModelError, QfxError
from qfx_onnx.train.finetune import Callback
from qfx_onnx_cli.main import QfxCommand, app, err_console, run_command
from qfx_onnx_cli.options import (
    DEFAULT_CALIBRATION, AnnotatedModel, Calibration, CalibSamples, EvalData, Force, Json, NewActBits, NewBiasBits,
    NewElementwiseBits, NewInputBits, NewWeightBits, PerChannel, Quiet, TrainingData, Verify, calibration_method,
    check_new_file)
from qfx_onnx_cli.output import Output


@app.command(cls=QfxCommand)
def finetune(
    model: AnnotatedModel,
    data: TrainingData,
    output: Path = typer.Option(..., "-o", "--output", metavar="FILE", help="Annotated ONNX to write with the learned formats."),
    eval_data: EvalData = None,
    task: str = typer.Option("classification", "--task", help="classification (cross-entropy) or regression (MSE)."),
    target: str = typer.Option("y", "--target", help="What the output learns: y (the data's labels or targets) or input "
                                                     "(each sample itself: an autoencoder; with --task regression, y not needed)."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs."),
    batch_size: int = typer.Option(64, "--batch-size", help="GLOBAL batch size (split across torchrun processes)."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of the weights."),
    frac_lr: float | None = typer.Option(None, "--frac-lr", show_default="30 x --lr", help="Learning rate of the binary points."),
    optimizer: str = typer.Option("adam", "--optimizer", help="adam, adamw or sgd (momentum 0.9)."),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="cosine, step (x0.1 at 50% and 75%) or none."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay of the weights (not biases or binary points)."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives identical results."),
    patience: int | None = typer.Option(None, "--patience", show_default="no early stop",
                                        help="Stop after this many epochs without a better evaluation."),
    val_fraction: float | None = typer.Option(None, "--val-fraction", show_default="0.1; none with a val_idx split",
                                              help="Share of the training data set aside (seeded, stratified by class) to "
                                                   "select the best epoch on; 0: no selection, the last epoch is kept."),
    freeze_binary_points: bool = typer.Option(False, "--freeze-binary-points", help="Keep every binary point (plain QAT)."),
    recalibrate_imported: bool = typer.Option(
        False, "--recalibrate-imported",
        help="Learn the binary points of the types an imported QONNX/QDQ model fixed (annotated qfx.imported) "
             "like any other; by default they are kept as given (their weights still train)."),
    per_channel: PerChannel = False,
    weight_bits: NewWeightBits = None,
    act_bits: NewActBits = None,
    input_bits: NewInputBits = None,
    elementwise_bits: NewElementwiseBits = None,
    bias_bits: NewBiasBits = None,
    calibration: Calibration = DEFAULT_CALIBRATION,
    calib_samples: CalibSamples = 512,
    khot: int | None = typer.Option(None, "--khot", metavar="K", show_default="off",
                                    help="K-hot weights: at most K ones per code (K shift-adds per product). Their "
                                         "casts round to the nearest K-hot code and saturate (AP_RND, AP_SAT), "
                                         "whatever rounding and overflow modes the weights had."),
    csd: bool = typer.Option(False, "--csd", help="With --khot: count signed digits (canonical signed digit)."),
    khot_elementwise: bool = typer.Option(False, "--khot-elementwise", help="With --khot: BatchNorm scales and other constant multipliers too."),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", metavar="FOLDER", show_default="<output>.ckpt beside the output",
                                               help="Checkpoint folder: last.pt after every epoch (ignored by git: *.ckpt/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in the checkpoint folder."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (under torchrun: each rank its own GPU)."),
    train_dtype: str = typer.Option("float32", "--train-dtype", help="Training precision: float32 (fast; casts exact for W <= 24) or float64."),
    threads: int | None = typer.Option(None, "--threads", show_default="torch's", help="Intra-op CPU threads per process; 1 is often fastest for small models."),
    verify: Verify = True,
    force: Force = False,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Train weights and binary points of a fixed-point model; write the annotated result.

    Several processes: torchrun --nproc-per-node N --no-python qfx-onnx finetune ... (gloo on CPU,
    NCCL with --device cuda; --batch-size stays the global batch; only rank 0 writes files).

    --json: model, output, best_epoch, epochs_run, stopped_early, seconds, split, before, validation, test, history,
    moved, binary_points (before and after), checkpoints, verify, prepared (what changed the model before training:
    new widths, per-channel binary points, K-hot projection of the weights; "before" scores the changed model).
    """
    args = dict(locals())
    ui = Output(json_mode=args.pop("json_output"), quiet=args.pop("quiet"))
    run_command(lambda: _finetune(**args, ui=ui))


def _finetune(model, data, output, eval_data, task, target, epochs, batch_size, lr, frac_lr, optimizer, lr_schedule,
              weight_decay, seed, patience, val_fraction, freeze_binary_points, recalibrate_imported, per_channel, weight_bits, act_bits, input_bits,
              elementwise_bits, bias_bits, calibration, calib_samples, khot, csd, khot_elementwise, checkpoint_dir,
              resume, device, train_dtype, threads, verify, force, ui: Output) -> None:
    from qfx_onnx.quant.annotated import read_annotated, verify_annotated
    from qfx_onnx.quant.annotated_write import build_annotated, save_annotated
    from qfx_onnx.train import FinetuneConfig, FinetuneInterrupted, finetune as run_finetune
    from qfx_onnx.train.batches import load_task_dataset, npz_keys
    from qfx_onnx.train.prepare import khot_mode_changes, set_widths, to_khot, to_per_channel

    if not model.is_file():
        raise OnnxModelError(f"{model}: no such file")
    _check_output(model, output, force)
    calibration = calibration_method(calibration, None)
    if (csd or khot_elementwise) and khot is None:
        raise QfxError("--csd and --khot-elementwise need --khot K")
    if calib_samples < 1:
        raise QfxError(f"--calib-samples {calib_samples}: must be >= 1")
    if target not in ("y", "input"):
        raise QfxError(f"--target {target!r}: choose y or input")
    if target == "input" and task != "regression":
        raise QfxError("--target input trains the model to reproduce its input, which is regression: add --task regression")
    if threads is not None:
        if threads < 1:
            raise QfxError(f"--threads {threads}: must be >= 1")
        torch.set_num_threads(threads)
    config = FinetuneConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, frac_lr=frac_lr, optimizer=optimizer, weight_decay=weight_decay,
        lr_schedule=lr_schedule, task=task, learn_binary_points=not freeze_binary_points, seed=seed, patience=patience,
        recalibrate_imported=recalibrate_imported,
        val_fraction=0.1 if val_fraction is None else val_fraction,
        device=device, train_dtype=train_dtype, resume=resume,
        checkpoint_dir=str(checkpoint_dir or output.with_name(output.name + ".ckpt")))
    config.check()
    rank = int(os.environ.get("RANK", "0") or 0)
    show = rank == 0
    existing = Path(config.checkpoint_dir) / "last.pt"
    if existing.is_file() and not resume:
        if not force:
            raise QfxError(f"{existing} already exists: pass --force to replace it, or --resume to continue its run")
        if show:
            ui.line(f"starting afresh: --force replaces {existing}")

    named_val = "val_idx" in npz_keys(data)
    if named_val and val_fraction is not None:
        raise QfxError(f"{data}: has a val_idx split; --val-fraction would carve another validation set; drop one of them")
    if target == "input":
        train_set = load_task_dataset(data, "train", task, target_input=True)
        val_set = load_task_dataset(data, "val", task, target_input=True) if named_val else None
        eval_set = (load_task_dataset(eval_data, None, task, target_input=True) if eval_data
                    else load_task_dataset(data, "test", task, missing_ok=True, target_input=True))
    else:
        for spec in (data, eval_data):
            _require_targets(spec, task)
        train_set = load_task_dataset(data, "train", task)
        val_set = load_task_dataset(data, "val", task) if named_val else None
        eval_set = load_task_dataset(eval_data, None, task) if eval_data else load_task_dataset(data, "test", task, missing_ok=True)
        for spec, dataset in ((data, train_set), (data, val_set), (eval_data or data, eval_set)):
            if dataset is not None and not isinstance(dataset[0], (tuple, list)):
                raise _no_targets(spec, task)
    if val_set is None and config.val_fraction == 0 and show:
        ui.warn("--val-fraction 0: no validation data, no selection; the last epoch is kept")
    if eval_set is None and show:
        ui.warn("no test data (pass --eval-data, or an .npz with test_idx): no test score will be reported")

    fixed = read_annotated(model)
    _check_input_shape(fixed, train_set)
    if task == "classification":  # before any training or checkpoint: labels must name class outputs
        for spec, dataset in ((data, train_set), (data, val_set), (eval_data or data, eval_set)):
            _check_labels(fixed, dataset, str(spec))
    widths = {role: bits for role, bits in (("weight", weight_bits), ("act", act_bits), ("input", input_bits or act_bits),
                                           ("elementwise", elementwise_bits), ("constant", elementwise_bits),
                                           ("bias", bias_bits)) if bits is not None}
    calib = _calibration_batches(train_set, calib_samples)
    prepared = []  # what changed the model since it was written: its "before" score is of the changed model
    if widths:
        if set_widths(fixed, widths, ui.track(calib, "calibrating binary points") if show else calib, method=calibration):
            prepared.append("new widths")
    if per_channel and to_per_channel(fixed, method=calibration):
        prepared.append("per-channel binary points")
    if khot is not None:
        types = fixed.fixed_types()
        if to_khot(fixed, khot, signed_digits=csd, elementwise=khot_elementwise, method=calibration):
            prepared.append("K-hot projection of the weights")
        changed = khot_mode_changes(types, fixed.fixed_types())
        if changed and show:
            ui.warn(f"--khot: {len(changed)} tensor(s) now round to the nearest K-hot code and saturate (AP_RND, AP_SAT) "
                    f"instead of {' / '.join(sorted(set(changed.values())))}")

    progress = _Progress(ui.people if show and ui.progress else None,
                         lines=show and not ui.quiet and not ui.people.is_terminal)
    try:
        with progress:
            result = run_finetune(fixed, train_set, eval_set, config, val=val_set, callbacks=[progress])
    except FinetuneInterrupted as exc:
        if show:
            err_console.print(Text(str(exc), style="yellow"))
        raise typer.Exit(130) from None
    if result.rank != 0:
        return
    # verify the exact bytes about to be written, then write: a model that fails verification
    # leaves no output file
    proto = build_annotated(result.model, source=model.name)
    verified = None
    if verify:
        x = calib[0][:64]
        with ui.status("verifying in onnxruntime"):
            check = verify_annotated(result.model, proto, x)
        verified = {"ok": check.ok, "summary": check.summary(), "samples": len(x)}
        if check.ok:
            ui.line(f"verify: onnxruntime matches the emulation bit for bit on {len(x)} samples")
        else:
            ui.final(Text(f"verify: {check.summary()}", style="red" if check.unexpected else "yellow"))
            if check.unexpected:
                raise QfxError(f"{output}: not written: onnxruntime and the emulation disagree where exactness was "
                               f"guaranteed ({', '.join(check.unexpected[:5])})")
    save_annotated(proto, result.model, output)
    _summary(result, output, prepared, ui)
    ui.result({**_result_json(result, model, output, verified), "prepared": prepared})


def _check_output(model: Path, output: Path, force: bool) -> None:
    if output.resolve() == model.resolve() or (output.exists() and os.path.samefile(output, model)):
        raise QfxError(f"{output}: refusing to overwrite the input model; choose another -o")
    if not output.parent.is_dir():
        raise QfxError(f"{output.parent}: output folder does not exist")
    check_new_file(output, force)


def _check_labels(fixed, dataset, spec: str) -> None:
    """DataError naming ``spec`` unless every class label of ``dataset`` is a class output of the
    model (its first output's width on one sample); label tensors only, others are left to training."""
    from qfx_onnx.data import score
    from qfx_onnx.train.batches import class_labels

    if dataset is None:
        return
    labels = class_labels(dataset)
    if labels is None or not len(labels):
        return
    x, _ = dataset[0]
    out = fixed.predict(x.unsqueeze(0))
    out = out[0] if isinstance(out, tuple) else out
    score(out.expand(len(labels), *out.shape[1:]), labels, spec)  # raises for a label outside the outputs


def _no_targets(spec: str, task: str) -> DataError:
    if task == "regression":
        return DataError(f"{spec}: no targets (y) to train on; add y to the data, or pass --target input "
                         "to train the model to reproduce its input (an autoencoder)")
    return DataError(f"{spec}: no labels (y) to train on; add integer class labels y to the data "
                     "(an autoencoder: --task regression --target input)")


def _require_targets(spec: str | None, task: str) -> None:
    """Raise the DataError of :func:`_no_targets` for a file without targets (a hook's items are
    checked once loaded; a missing or unreadable file is left to the loader to report)."""
    if spec is None:
        return
    suffix = Path(spec).suffix.lower()
    if suffix == ".npy" or (suffix == ".npz" and "x" in (keys := _npz_keys(spec)) and "y" not in keys):
        raise _no_targets(spec, task)


def _npz_keys(spec: str) -> set[str]:
    from qfx_onnx.train.batches import npz_keys

    return npz_keys(spec)


def _check_input_shape(fixed, dataset) -> None:
    from qfx_onnx.data import check_matches_model

    info = getattr(fixed.graph_module, "onnx_info", None)
    if info is None or not info.input_shapes or info.input_shapes[0] is None:
        return
    item = dataset[0]
    x = item[0] if isinstance(item, (tuple, list)) else item
    check_matches_model(x.unsqueeze(0), info.input_shapes[0], "training data")


def _calibration_batches(dataset, n: int):
    import torch

    from qfx_onnx.train.batches import eval_batches

    xs, total = [], 0
    for x, _ in eval_batches(dataset, 256):
        xs.append(x)
        total += len(x)
        if total >= n:
            break
    if not xs:
        raise DataError("the training set is empty")
    return list(torch.cat(xs)[:n].split(256))


def _summary(result, output: Path, prepared: list[str], ui: Output) -> None:
    moved = result.moved_binary_points()
    if ui.quiet:
        ui.final(f"wrote {output}")
        return
    def acc(m):
        if not m:  # None, or {} when there was no evaluation set
            return "-"
        return f"{m['accuracy']:.2%}" if "accuracy" in m else f"loss {m['loss']:.4g}"
    split = result.split
    if split["kind"] == "none":
        chosen, after = f"last epoch {result.epochs_run} kept (no validation data, no selection)", "last epoch, no selection"
    else:
        where = (f"{split['val_samples']} samples carved from the training data" + (", stratified by class" if split["stratified"] else "")
                 if split["kind"] == "carved" else f"{split['val_samples']} samples of the data's val_idx split")
        chosen, after = f"epoch {result.best_epoch} of {result.epochs_run} selected on validation ({where})", "after selection on validation"
    ui.final(f"wrote {output}: {chosen}{' (stopped early)' if result.stopped_early else ''}, {result.seconds:.0f} s")
    if result.validation is not None:
        # "before" is the model trained from: after any width change, per-channel split or K-hot
        # projection, so it can differ from the accuracy quantize printed for the file
        before = f"before (after {' and '.join(prepared)})" if prepared else "before"
        ui.line(f"validation: {before} {acc(result.initial)}, after {acc(result.validation)} (exact fixed-point pass)")
    if result.final is not None:
        measure = "test accuracy" if "accuracy" in result.final else "test"
        ui.line(f"{measure} (evaluated once, {after}): {acc(result.final)} on {result.final['count']} samples "
                      "(exact fixed-point pass)")
    ui.line(f"binary points moved in {len(moved)} of {len(result.binary_points)} tensors")
    for name, (before, after) in list(moved.items())[:10]:
        ui.line(f"  {name}: F {_fracs(before)} -> {_fracs(after)}")
    if result.checkpoint is not None:
        ui.line(f"checkpoints: {result.checkpoint.parent}")


def _result_json(result, model: Path, output: Path, verified: dict | None) -> dict:
    """What --json prints: the run as the summary tells it, with every binary point."""
    return {"model": str(model), "output": str(output), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early, "seconds": result.seconds, "split": result.split,
            "before": result.initial, "validation": result.validation, "test": result.final,
            "history": result.history, "moved": len(result.moved_binary_points()),
            "binary_points": {name: {"before": before, "after": after} for name, (before, after) in result.binary_points.items()},
            "checkpoints": None if result.checkpoint is None else str(result.checkpoint.parent), "verify": verified}


def _fracs(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"[{', '.join(map(str, values[:6]))}{', ...' if len(values) > 6 else ''}]"


class _Progress(Callback):
    """On a terminal (``console`` given): a bar of the batches of the current epoch, with the loss,
    the last validation score, elapsed and remaining time. In logs (``lines``): one plain line per
    epoch. Otherwise nothing."""

    def __init__(self, console, lines: bool) -> None:
        self.lines = lines
        self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                            TextColumn("batches  loss {task.fields[loss]:.4f}  val {task.fields[acc]}", markup=False),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) if console else None
        self.task = None
        self.epoch = 0
        self.acc = "-"

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def on_start(self, info) -> None:
        self.epochs, self.steps = info["epochs"], info["steps_per_epoch"]
        initial = info["initial"]
        if initial and "val_accuracy" in initial:
            self.acc = f"{initial['val_accuracy']:.2%}"
        elif initial and "val_loss" in initial:
            self.acc = f"{initial['val_loss']:.4g}"
        if self.lines and initial and "val_loss" in initial and info["start_epoch"] == 0 and info["start_step"] == 0:
            err_console.print(f"epoch 0: val {self.acc}", highlight=False)
        if self.bar is not None:
            self.epoch = info["start_epoch"] + 1
            self.task = self.bar.add_task(self._title(), total=self.steps, completed=info["start_step"],
                                          loss=float("nan"), acc=self.acc)

    def _title(self) -> str:
        return f"epoch {self.epoch}/{self.epochs}"

    def on_step(self, epoch, step, loss) -> None:
        if self.bar is None:
            return
        if epoch != self.epoch:  # a new epoch: the bar counts its batches from zero
            self.epoch = epoch
            self.bar.reset(self.task, total=self.steps, completed=step - 1, description=self._title())
        self.bar.update(self.task, advance=1, loss=loss)

    def on_epoch_end(self, record) -> None:
        if "val_accuracy" in record:
            self.acc = f"{record['val_accuracy']:.2%}"
        elif "val_loss" in record:
            self.acc = f"{record['val_loss']:.4g}"
        if self.bar is not None:
            self.bar.update(self.task, acc=self.acc)
        if self.lines:
            val = f", val {self.acc}{' *' if record.get('best') else ''}" if "val_loss" in record else ""  # *: best so far
            err_console.print(f"epoch {record['epoch']}/{self.epochs}: train loss {record['train_loss']:.4f}{val} "
                              f"({record['seconds']:.1f} s)", highlight=False)
