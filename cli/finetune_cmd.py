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
from qfx_onnx_cli.main import app, console, err_console, run_command


@app.command()
def finetune(
    model: Path = typer.Argument(..., help="Annotated model from `qfx-onnx quantize` (.qfx.onnx)."),
    data: str = typer.Option(..., "--data", help="Training data: .npz (x, y; its train split if it has one) or module:function."),
    output: Path = typer.Option(..., "-o", "--output", help="Annotated ONNX to write with the learned formats."),
    eval_data: str | None = typer.Option(None, "--eval-data", help="Evaluation data (default: the test split of a --data .npz)."),
    task: str = typer.Option("classification", help="classification (cross-entropy) or regression (MSE)."),
    target: str = typer.Option("y", "--target", help="What the output learns: y (the data's labels or targets) or input "
                                                     "(each sample itself: an autoencoder; with --task regression, y not needed)."),
    epochs: int = typer.Option(10, help="Training epochs."),
    batch_size: int = typer.Option(64, help="GLOBAL batch size (split across torchrun processes)."),
    lr: float = typer.Option(1e-3, help="Learning rate of the weights."),
    frac_lr: float | None = typer.Option(None, help="Learning rate of the binary points [default: 30 x --lr]."),
    optimizer: str = typer.Option("adam", help="adam, adamw or sgd (momentum 0.9)."),
    lr_schedule: str = typer.Option("cosine", help="cosine, step (x0.1 at 50% and 75%) or none."),
    weight_decay: float = typer.Option(0.0, help="Weight decay of the weights (not biases or binary points)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives identical results."),
    patience: int | None = typer.Option(None, help="Stop after this many epochs without a better evaluation."),
    freeze_binary_points: bool = typer.Option(False, "--freeze-binary-points", help="Keep every binary point (plain QAT)."),
    per_channel: bool = typer.Option(False, "--per-channel", help="One binary point per output channel of each weight."),
    weight_bits: int | None = typer.Option(None, help="New width of weights (recalibrated before training)."),
    act_bits: int | None = typer.Option(None, help="New width of activations (and of the input unless --input-bits)."),
    input_bits: int | None = typer.Option(None, help="New width of the model input."),
    elementwise_bits: int | None = typer.Option(None, help="New width of BatchNorm, residual adds, pooling and their constants."),
    bias_bits: int | None = typer.Option(None, help="New width of biases."),
    calibration: str = typer.Option("mse", help="Recalibration for changed widths/K-hot/per-channel: max, percentile or mse."),
    calib_samples: int = typer.Option(512, help="Training samples used to recalibrate activations."),
    khot: int | None = typer.Option(None, "--khot", help="K-hot weights: at most K ones per code (K shift-adds per product)."),
    csd: bool = typer.Option(False, "--csd", help="With --khot: count signed digits (canonical signed digit)."),
    khot_elementwise: bool = typer.Option(False, "--khot-elementwise", help="With --khot: BatchNorm scales and other constant multipliers too."),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Checkpoint folder [default: <output>.ckpt]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in the checkpoint folder."),
    device: str = typer.Option("cpu", help="cpu or cuda (under torchrun: each rank its own GPU)."),
    train_dtype: str = typer.Option("float32", help="Training precision: float32 (fast; casts exact for W <= 24) or float64."),
    threads: int | None = typer.Option(None, help="Intra-op CPU threads per process [default: torch's]; 1 is often fastest for small models."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Run the written ONNX in onnxruntime and compare bit for bit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Train weights and binary points of a fixed-point model; write the annotated result.

    Several processes: torchrun --nproc-per-node N --no-python qfx-onnx finetune ... (gloo on CPU,
    NCCL with --device cuda; --batch-size stays the global batch; only rank 0 writes files).
    """
    args = dict(locals())
    run_command(lambda: _finetune(**args))


def _finetune(model, data, output, eval_data, task, target, epochs, batch_size, lr, frac_lr, optimizer, lr_schedule,
              weight_decay, seed, patience, freeze_binary_points, per_channel, weight_bits, act_bits, input_bits,
              elementwise_bits, bias_bits, calibration, calib_samples, khot, csd, khot_elementwise, checkpoint_dir,
              resume, device, train_dtype, threads, verify, quiet) -> None:
    from qfx_onnx.quant.annotated import read_annotated, verify_annotated
    from qfx_onnx.quant.annotated_write import build_annotated, save_annotated
    from qfx_onnx.train import FinetuneConfig, FinetuneInterrupted, finetune as run_finetune
    from qfx_onnx.train.batches import load_task_dataset
    from qfx_onnx.train.prepare import set_widths, to_khot, to_per_channel

    if not model.is_file():
        raise OnnxModelError(f"{model}: no such file")
    _check_output(model, output)
    if calibration not in ("max", "percentile", "mse"):
        raise QfxError(f"--calibration {calibration!r}: choose max, percentile or mse")
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
        device=device, train_dtype=train_dtype, resume=resume,
        checkpoint_dir=str(checkpoint_dir or output.with_name(output.name + ".ckpt")))
    config.check()
    rank = int(os.environ.get("RANK", "0") or 0)
    show = rank == 0
    existing = Path(config.checkpoint_dir) / "last.pt"
    if existing.is_file() and not resume and show:
        console.print(f"note: starting afresh; {existing} will be replaced (pass --resume to continue it)")

    if target == "input":
        train_set = _input_target_set(data, "train")
        eval_set = _input_target_set(eval_data, None) if eval_data else _input_target_set(data, "test", missing_ok=True)
    else:
        for spec in (data, eval_data):
            _require_targets(spec, task)
        train_set = load_task_dataset(data, "train", task)
        eval_set = load_task_dataset(eval_data, None, task) if eval_data else load_task_dataset(data, "test", task, missing_ok=True)
        for spec, dataset in ((data, train_set), (eval_data or data, eval_set)):
            if dataset is not None and not isinstance(dataset[0], (tuple, list)):
                raise _no_targets(spec, task)
    if eval_set is None and show:
        console.print("no evaluation data (pass --eval-data, or an .npz with test_idx): the last epoch is kept")

    fixed = read_annotated(model)
    _check_input_shape(fixed, train_set)
    widths = {role: bits for role, bits in (("weight", weight_bits), ("act", act_bits), ("input", input_bits or act_bits),
                                           ("elementwise", elementwise_bits), ("constant", elementwise_bits),
                                           ("bias", bias_bits)) if bits is not None}
    calib = _calibration_batches(train_set, calib_samples)
    if widths:
        set_widths(fixed, widths, calib, method=calibration)
    if per_channel:
        to_per_channel(fixed, method=calibration)
    if khot is not None:
        to_khot(fixed, khot, signed_digits=csd, elementwise=khot_elementwise, method=calibration)

    progress = _Progress(enabled=show and not quiet and console.is_terminal, lines=show and not quiet and not console.is_terminal)
    try:
        with progress:
            result = run_finetune(fixed, train_set, eval_set, config, callbacks=[progress])
    except FinetuneInterrupted as exc:
        if show:
            err_console.print(Text(str(exc), style="yellow"))
        raise typer.Exit(130) from None
    if result.rank != 0:
        return
    # verify the exact bytes about to be written, then write: a model that fails verification
    # leaves no output file
    proto = build_annotated(result.model, source=model.name)
    if verify:
        x = calib[0][:64]
        check = verify_annotated(result.model, proto, x)
        if check.ok:
            if not quiet:
                console.print(f"verify: onnxruntime matches the emulation bit for bit on {len(x)} samples")
        else:
            console.print(Text(f"verify: {check.summary()}", style="red" if check.unexpected else "yellow"))
            if check.unexpected:
                raise QfxError(f"{output}: not written: onnxruntime and the emulation disagree where exactness was "
                               f"guaranteed ({', '.join(check.unexpected[:5])})")
    save_annotated(proto, result.model, output)
    _summary(result, output, quiet)


def _check_output(model: Path, output: Path) -> None:
    if output.resolve() == model.resolve() or (output.exists() and os.path.samefile(output, model)):
        raise QfxError(f"{output}: refusing to overwrite the input model; choose another -o")
    if not output.parent.is_dir():
        raise QfxError(f"{output.parent}: output folder does not exist")
    if output.exists() and output.is_dir():
        raise QfxError(f"{output}: is a folder")


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
    """The keys of a readable .npz file; empty for anything else (the loaders report why)."""
    import numpy as np

    if Path(spec).suffix.lower() != ".npz" or not Path(spec).is_file():
        return set()
    try:
        with np.load(spec, allow_pickle=False) as archive:
            return set(archive.files)
    except (OSError, ValueError, EOFError):
        return set()


def _input_target_set(spec: str, split: str | None, missing_ok: bool = False):
    """``--target input``: each sample paired with itself as the target (an autoencoder).

    Splits as for ``--target y``: an .npz's ``{split}_idx`` rows when it has them, otherwise every
    row for training and no evaluation set (None when ``missing_ok``); a hook is called with
    ``split=``. Any ``y`` in the data is ignored.
    """
    from torch.utils.data import TensorDataset

    from qfx_onnx.data import load_arrays

    is_file = Path(spec).suffix.lower() in (".npz", ".npy")
    if is_file and split is not None:
        if f"{split}_idx" not in _npz_keys(spec):
            if split == "test":
                if missing_ok:
                    return None
                raise DataError(f"{spec}: no test_idx split to evaluate on; pass --eval-data")
            split = None
    try:
        x, _ = load_arrays(spec, split, real_targets=True)
    except DataError:
        if missing_ok and not is_file:
            return None
        raise
    return TensorDataset(x, x)


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


def _summary(result, output: Path, quiet: bool) -> None:
    moved = result.moved_binary_points()
    if quiet:
        console.print(f"wrote {output}")
        return
    def acc(m):
        if not m:  # None, or {} when there was no evaluation set
            return "-"
        return f"{m['accuracy']:.2%}" if "accuracy" in m else f"loss {m['loss']:.4g}"
    console.print(f"wrote {output}: best epoch {result.best_epoch} of {result.epochs_run}"
                  f"{' (stopped early)' if result.stopped_early else ''}, {result.seconds:.0f} s")
    console.print(f"evaluation: before {acc(result.initial)}, after {acc(result.final)} (exact fixed-point pass)")
    console.print(f"binary points moved in {len(moved)} of {len(result.binary_points)} tensors")
    for name, (before, after) in list(moved.items())[:10]:
        console.print(f"  {name}: F {_fracs(before)} -> {_fracs(after)}", highlight=False)
    if result.checkpoint is not None:
        console.print(f"checkpoints: {result.checkpoint.parent}")


def _fracs(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"[{', '.join(map(str, values[:6]))}{', ...' if len(values) > 6 else ''}]"


class _Progress(Callback):
    """A rich progress bar on a terminal, or one plain line per epoch in logs."""

    def __init__(self, enabled: bool, lines: bool) -> None:
        self.enabled, self.lines = enabled, lines
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}  eval {task.fields[acc]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True) if enabled else None
        self.task = None
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
        if initial and "eval_accuracy" in initial:
            self.acc = f"{initial['eval_accuracy']:.2%}"
        elif initial and "eval_loss" in initial:
            self.acc = f"{initial['eval_loss']:.4g}"
        if self.lines and initial and info["start_epoch"] == 0 and info["start_step"] == 0:
            err_console.print(f"epoch 0: eval {self.acc}", highlight=False)
        if self.bar is not None:
            total = self.epochs * self.steps
            done = info["start_epoch"] * self.steps + info["start_step"]
            self.task = self.bar.add_task(f"epoch {info['start_epoch'] + 1}/{self.epochs}", total=total,
                                          completed=done, loss=float("nan"), acc=self.acc)

    def on_step(self, epoch, step, loss) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=loss, description=f"epoch {epoch}/{self.epochs}")

    def on_epoch_end(self, record) -> None:
        if "eval_accuracy" in record:
            self.acc = f"{record['eval_accuracy']:.2%}"
        elif "eval_loss" in record:
            self.acc = f"{record['eval_loss']:.4g}"
        if self.bar is not None:
            self.bar.update(self.task, acc=self.acc)
        if self.lines:
            mark = " *" if record.get("best") else ""
            err_console.print(f"epoch {record['epoch']}/{self.epochs}: train loss {record['train_loss']:.4f}, "
                              f"eval {self.acc}{mark} ({record['seconds']:.1f} s)", highlight=False)
