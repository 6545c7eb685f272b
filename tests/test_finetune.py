"""finetune(): learned binary points, QAT vs PTQ, K-hot, determinism, checkpoints and resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qfx_onnx.data import ArrayDataset, load_arrays
from qfx_onnx.errors import QfxError
from qfx_onnx.fixed.khot import KHotQuantizer, digit_count
from qfx_onnx.fixed.reference import reference_cast, reference_codes
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.annotated import KEY_KHOT, annotations, parse_types, read_annotated, write_annotated
from qfx_onnx.quant.quantize import quantize_graph
from qfx_onnx.train import Callback, FinetuneConfig, FinetuneInterrupted, evaluate, finetune
from qfx_onnx.train import checkpoint as ckpt
from qfx_onnx.train.prepare import set_widths, to_khot, to_per_channel

MODELS = Path(__file__).resolve().parent.parent / "models"
DATA = MODELS / "digits.npz"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    x, y = load_arrays(DATA, "train")
    xt, yt = load_arrays(DATA, "test")
    return ArrayDataset(x, y, "train"), ArrayDataset(xt, yt, "test")


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("models") / "mlp.qfx.onnx"
    write_annotated(quantize_graph(load_onnx(MODELS / "mlp.onnx"), [digits[0].x[:512]]), path, source="mlp.onnx")
    return path


def subset(ds: ArrayDataset, n: int) -> ArrayDataset:
    return ArrayDataset(ds.x[:n], ds.y[:n], f"{ds.source}[:{n}]")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Interrupt(Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) after a given epoch or step."""

    def __init__(self, epoch: int, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def on_step(self, epoch, step, loss):
        if self.step is not None and (epoch, step) == (self.epoch, self.step):
            raise KeyboardInterrupt

    def on_epoch_end(self, record):
        if self.step is None and record["epoch"] == self.epoch:
            raise KeyboardInterrupt


class Steps(Callback):
    """Records where a run starts and every (epoch, step) it trains."""

    def __init__(self) -> None:
        self.start, self.seen = None, []

    def on_start(self, info):
        self.start = (info["start_epoch"], info["start_step"])

    def on_step(self, epoch, step, loss):
        self.seen.append((epoch, step))


def lsq_surrogate_derivative(x: torch.Tensor, xq: torch.Tensor, g: torch.Tensor, inside: torch.Tensor, f0: float) -> float:
    """Central finite difference at F = f0 of sum(g * psi(F)), the function whose derivative the
    binary-point gradient is (quantizer.py): inside the range psi = x + 2**-F * (K - x * 2**f0)
    (rounding passed straight through), outside it psi = 2**-F * K, with K = xq * 2**f0 fixed."""
    k = xq * 2.0**f0

    def psi(f: float) -> float:
        s = 2.0**-f
        return float((g * torch.where(inside, x + s * (k - x * 2.0**f0), s * k)).sum())

    h = 1e-5
    return (psi(f0 + h) - psi(f0 - h)) / (2 * h)


def assert_frac_grads_match_finite_differences(model, x: torch.Tensor, y: torch.Tensor) -> None:
    """Every learned binary point's gradient of the cross-entropy loss (float64) equals
    ``1/sqrt(n * code_max)`` times the finite difference of its surrogate (LSQ scaling)."""
    seen, handles = {}, []
    for name, q in model.quantizers().items():
        def hook(module, inputs, out, name=name):
            if inputs[0].requires_grad:
                inputs[0].retain_grad()
            out.retain_grad()
            seen[name] = (module, inputs[0], out)
        handles.append(q.register_forward_hook(hook))
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    try:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    finally:
        for handle in handles:
            handle.remove()
    checked = 0
    for name, (q, inp, out) in seen.items():
        assert q.per_channel_axis is None and q.frac.grad is not None, name
        g = out.grad.detach()
        inside = (inp.grad != 0) | (g == 0)  # the STE passes the input gradient only inside the range
        t = q.frozen_types()[0]
        fd = lsq_surrogate_derivative(inp.detach(), out.detach(), g, inside, float(t.frac))
        scale = 1.0 / math.sqrt(inp.numel() * max(t.int_max, 1))
        assert q.frac.grad.item() == pytest.approx(scale * fd, rel=1e-6, abs=1e-12), name
        checked += abs(fd) > 0
    assert len(seen) == len(model.quantizers()) > 0 and checked >= len(seen) // 2, (len(seen), checked)


def four_bit(path, train: ArrayDataset):
    model = read_annotated(path)
    set_widths(model, {"weight": 4, "act": 4, "input": 4}, [train.x[:512]], method="mse")
    return model


def test_binary_points_move_loss_falls_and_qat_beats_ptq(mlp_file, digits):
    train, test = digits
    model = four_bit(mlp_file, train)
    ptq = evaluate(copy.deepcopy(model), test)["accuracy"]
    # no eval data: the last epoch is returned, so best-model selection cannot hide a regression
    result = finetune(model, subset(train, 768), None, FinetuneConfig(epochs=4, batch_size=32, seed=1))
    losses = [r["train_loss"] for r in result.history[1:]]
    assert losses[-1] < losses[0]
    assert result.moved_binary_points(), "no binary point moved"
    qat = evaluate(result.model, test)["accuracy"]
    assert qat >= ptq, (qat, ptq)
    assert result.model.graph_module.qfx_cast_1.frac.dtype == torch.float64


def test_frozen_binary_points_do_not_move(mlp_file, digits):
    train, test = digits
    model = four_bit(mlp_file, train)
    result = finetune(model, subset(train, 256), test, FinetuneConfig(epochs=2, batch_size=32, learn_binary_points=False))
    assert result.moved_binary_points() == {}
    assert result.validation["accuracy"] == result.history[result.best_epoch]["val_accuracy"]


def test_same_seed_same_weights_other_seed_differs(mlp_file, digits):
    train = subset(digits[0], 256)
    runs = [finetune(read_annotated(mlp_file), train, None, FinetuneConfig(epochs=1, batch_size=32, seed=s)).model
            for s in (3, 3, 4)]
    assert_same_state(state(runs[0]), state(runs[1]))
    assert any(not torch.equal(a, b) for a, b in zip(state(runs[0]).values(), state(runs[2]).values()))


@pytest.mark.parametrize("where", [(1, None), (2, 3)], ids=["after-epoch-1", "mid-epoch-2"])
def test_interrupt_then_resume_equals_uninterrupted(mlp_file, digits, tmp_path, where):
    train, test = subset(digits[0], 256), subset(digits[1], 120)
    config = dict(epochs=3, batch_size=32, seed=7, lr_schedule="cosine")
    full = finetune(read_annotated(mlp_file), train, test, FinetuneConfig(**config, checkpoint_dir=str(tmp_path / "a")))

    cfg = FinetuneConfig(**config, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(FinetuneInterrupted) as info:
        finetune(read_annotated(mlp_file), train, test, cfg, callbacks=[Interrupt(*where)])
    assert info.value.exit_code == 130 and info.value.checkpoint.is_file()
    saved = torch.load(info.value.checkpoint, weights_only=True)
    assert (saved["epoch"], saved["step"]) == ((1, 0) if where[1] is None else (1, 3))

    steps = Steps()
    resumed = finetune(read_annotated(mlp_file), train, test, FinetuneConfig(**config, checkpoint_dir=str(tmp_path / "b"), resume=True),
                       callbacks=[steps])
    # a resume, not a fresh rerun (which would end in the same state): it trains only the steps
    # the interrupted run had not done, starting right after the checkpoint
    per_epoch = 256 // 32
    done = where[0] * per_epoch if where[1] is None else (where[0] - 1) * per_epoch + where[1]
    assert steps.start == (done // per_epoch, done % per_epoch)
    assert steps.seen == [(e + 1, s + 1) for k in range(done, 3 * per_epoch) for e, s in [divmod(k, per_epoch)]]
    assert_same_state(state(full.model), state(resumed.model))
    assert [r["val_loss"] for r in full.history] == [r["val_loss"] for r in resumed.history]
    assert full.best_epoch == resumed.best_epoch and full.final == resumed.final


def _walk(value, path="ckpt"):
    """Every leaf of a checkpoint: only tensors and primitives may appear."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{path}: key {k!r}"
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        assert value is None or isinstance(value, (torch.Tensor, str, int, float, bool)), f"{path}: {type(value)}"
        yield value


def test_ctrl_c_leaves_weights_only_checkpoint(mlp_file, digits, tmp_path):
    train, test = subset(digits[0], 128), subset(digits[1], 60)
    cfg = FinetuneConfig(epochs=2, batch_size=32, checkpoint_dir=str(tmp_path))
    with pytest.raises(FinetuneInterrupted, match="--resume"):
        finetune(read_annotated(mlp_file), train, test, cfg, callbacks=[Interrupt(1, 2)])
    path = ckpt.checkpoint_path(tmp_path)
    loaded = torch.load(path, weights_only=True)  # the restricted unpickler accepts it
    assert loaded["format"] == ckpt.FORMAT and loaded["best"]["epoch"] == 0
    assert sum(isinstance(v, torch.Tensor) for v in _walk(loaded)) > 10
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"
    with pytest.raises(ckpt.CheckpointError, match="other settings"):
        finetune(read_annotated(mlp_file), train, test, FinetuneConfig(epochs=2, batch_size=32, lr=0.01,
                                                                        checkpoint_dir=str(tmp_path), resume=True))


def test_khot_codes_in_saved_file(mlp_file, digits, tmp_path):
    train, test = subset(digits[0], 256), digits[1]
    model = read_annotated(mlp_file)
    to_per_channel(model)
    to_khot(model, 2)
    result = finetune(model, train, test, FinetuneConfig(epochs=1, batch_size=32))
    out = tmp_path / "khot.qfx.onnx"
    write_annotated(result.model, out)

    proto = onnx.load(out)
    notes = annotations(proto.graph, "khot")
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    checked = 0
    for tensor, entries in notes.items():
        if KEY_KHOT not in entries:
            continue
        types, axis = parse_types(entries, tensor, "khot")
        values = inits[tensor + "::raw"]
        chunks = np.split(values, values.shape[axis], axis=axis) if isinstance(types, list) else [values]
        for t, v in zip(types if isinstance(types, list) else [types], chunks):
            codes = torch.from_numpy(reference_codes(v, t))
            assert int(digit_count(codes).max()) <= 2, tensor
            np.testing.assert_array_equal(reference_cast(v, t), v)  # stored values are exact codes
        checked += 1
    assert checked == 3  # the three Gemm weights
    again = read_annotated(out)
    assert sum(isinstance(q, KHotQuantizer) for q in again.quantizers().values()) == 3
    assert evaluate(again, test) == result.final


def test_regression_and_dataloader(mlp_file, digits):
    train, test = subset(digits[0], 256), subset(digits[1], 64)
    onehot = lambda ds: torch.utils.data.TensorDataset(ds.x, torch.nn.functional.one_hot(ds.y, 10).float() * 4)
    loader = torch.utils.data.DataLoader(onehot(train), batch_size=32, shuffle=False)
    val = ArrayDataset(digits[0].x[256:320], digits[0].y[256:320], "val")  # a DataLoader is not split: validation given
    result = finetune(read_annotated(mlp_file), loader, onehot(test),
                      FinetuneConfig(epochs=2, task="regression", lr=3e-3), val=onehot(val))
    assert "val_loss" in result.history[-1] and "val_accuracy" not in result.history[-1]
    assert result.final["loss"] < result.initial["loss"]


def test_bad_settings_are_one_line_errors(mlp_file, digits):
    model = read_annotated(mlp_file)
    for bad, match in ((dict(optimizer="lion"), "--optimizer"), (dict(batch_size=0), "--batch-size"),
                       (dict(resume=True), "checkpoint directory"), (dict(train_dtype="float16"), "--train-dtype")):
        with pytest.raises(QfxError, match=match):
            finetune(model, digits[0], None, FinetuneConfig(**bad))
    if not torch.cuda.is_available():
        with pytest.raises(QfxError, match="no CUDA device"):
            finetune(model, digits[0], None, FinetuneConfig(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_exact_cpu_evaluation(mlp_file, digits):
    train, test = subset(digits[0], 256), digits[1]
    result = finetune(read_annotated(mlp_file), train, test, FinetuneConfig(epochs=1, batch_size=32, device="cuda"))
    assert next(result.model.parameters()).device.type == "cpu"
    assert evaluate(result.model, test) == result.final


def test_model_is_a_plain_module_for_your_own_loop(mlp_file, digits, tmp_path):
    # the module docstring's example, a few steps
    train, test = digits
    model = read_annotated(mlp_file).float()
    fracs = [p for n, p in model.named_parameters() if n.endswith(".frac")]
    weights = [p for n, p in model.named_parameters() if not n.endswith(".frac")]
    opt = torch.optim.Adam([{"params": weights}, {"params": fracs, "lr": 0.1}], lr=1e-3)
    model.train()
    for i in range(8):
        loss = torch.nn.functional.cross_entropy(model(train.x[i * 32:(i + 1) * 32]), train.y[i * 32:(i + 1) * 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_frac_grads_match_finite_differences(model.double(), train.x[:64].double(), train.y[:64])
    model.eval()
    write_annotated(model, tmp_path / "own.qfx.onnx")
    assert evaluate(read_annotated(tmp_path / "own.qfx.onnx"), test) == evaluate(model, test)


def test_compiled_training_step_matches_eager(digits):
    # finetune --compile: torch.compile of the training model (one small model: compiling takes
    # seconds). The forward values are the same kernels, so every step's loss and the learned
    # weights agree with eager training up to the float rounding of fused sums; binary points
    # move (a high binary-point rate), so the compiled step sees types change.
    train = subset(digits[0], 192)
    model = quantize_graph(load_onnx(MODELS / "mlp.onnx"), [train.x[:128]])
    cfg = dict(epochs=2, batch_size=32, val_fraction=0.0, frac_lr=0.3)
    eager = finetune(copy.deepcopy(model), train, None, FinetuneConfig(**cfg))
    compiled = finetune(copy.deepcopy(model), train, None, FinetuneConfig(**cfg, compile=True))
    losses = [[h["train_loss"] for h in r.history if h["train_loss"] is not None] for r in (eager, compiled)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    assert eager.moved_binary_points() and compiled.moved_binary_points() == eager.moved_binary_points()
