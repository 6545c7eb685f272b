"""Train the five demo models on models/digits.npz and export them to ONNX.

Run after ``python models/make_dataset.py``: ``python models/train.py``. Writes, each atomically:

* ``models/{mlp,cnn,resnet,dscnn,transformer}.onnx``: opset 17, input ``input`` (batch, 1, 8, 8) float32 with a
  dynamic batch, output ``logits`` (batch, 10) with no softmax. BatchNormalization stays a node
  (exported with constant folding off), so the tool sees it as an element-wise affine.
* ``models/accuracy.json``: per model its float test accuracy (onnxruntime, test split),
  parameter count, initializer value count and op counts. The zoo tests check the models against it.
* ``models/README.md``: rendered whole from accuracy.json and the dataset attribution.

Training is deterministic: one CPU thread, fixed seeds, ``torch.use_deterministic_algorithms``.
Hyperparameters are fixed up front; the test split is used only for the reported accuracy.
Needs only torch, onnx and onnxruntime (the TorchScript exporter of torch 2.13, ``dynamo=False``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from qfx_onnx.data import load_arrays
from qfx_onnx.train.batches import validation_indices

HERE = Path(__file__).resolve().parent

SEED = 1234
OPSET = 17
EPOCHS = 60
VALIDATION_FRACTION = 0.15
SELECTED_ON_VALIDATION = {"transformer"}
"""Models whose kept weights are those of the epoch of best accuracy on a stratified validation
part of the training split (never the test split). The four older models keep their fixed-epoch
training on the whole training split, so that they (and their recorded numbers) stay as shipped."""
BATCH = 32
LR = 3e-3
WEIGHT_DECAY = 1e-4

log = logging.getLogger("train")


def conv_bn_relu(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def make_mlp() -> nn.Module:
    """Flatten, then Gemm+ReLU 64-64-32, then Gemm to 10 logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def make_cnn() -> nn.Module:
    """Two Conv+BN+ReLU+MaxPool blocks (16, 32 channels; 8x8 -> 4x4 -> 2x2), then Gemm 128 -> 10.

    The convs keep their bias so the tool sees both Conv-with-bias and a following BatchNorm.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128, 10),
    )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or 1x1 conv+BN when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(c_in, c_out, 3, stride),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def make_resnet() -> nn.Module:
    """Stem conv 16, residual blocks 16 (8x8) and 32 (stride 2, 4x4), GlobalAveragePool, Gemm."""
    return nn.Sequential(
        conv_bn_relu(1, 16),
        ResidualBlock(16, 16, 1),
        ResidualBlock(16, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def depthwise_separable(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(c_in, c_in, 3, groups=c_in), conv_bn_relu(c_in, c_out, 1))


def make_dscnn() -> nn.Module:
    """Stem conv 16, DS block 16->32, AveragePool 2, DS block 32->64, GlobalAveragePool, Gemm."""
    return nn.Sequential(
        conv_bn_relu(1, 16),
        depthwise_separable(16, 32), nn.AvgPool2d(2),
        depthwise_separable(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


class SelfAttention(nn.Module):
    """Multi-head softmax attention written out as the ops a user writes: Q/K/V Linear, split into
    heads (reshape, transpose), scores ``q @ k^T`` times ``1/sqrt(head_dim)``, softmax over keys,
    context ``weights @ v``, heads merged (transpose, reshape), output Linear."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale = self.head_dim ** -0.5
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (batch, heads, tokens, head_dim)
            return y.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scale, dim=-1)
        context = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, width)
        return self.out(context)


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer: ``x + attention(LN(x))``, then ``x + MLP(LN(x))`` (GELU, exact)."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(width), SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(nn.Module):
    """Each 8-pixel image row is a token: (batch, 1, 8, 8) -> 8 tokens of 8 features, Linear
    embedding to ``width`` plus a learned positional embedding, ``layers`` encoder layers, a final
    LayerNorm, the mean over tokens, Linear to 10 logits."""

    def __init__(self, width: int = 32, heads: int = 4, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(0.02 * torch.randn(1, 8, width))
        self.layers = nn.Sequential(*(EncoderLayer(width, heads, hidden) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(torch.flatten(x, 1, 2)) + self.position
        return self.head(self.norm(self.layers(tokens)).mean(dim=1))


def make_transformer() -> nn.Module:
    """2 pre-norm encoder layers, width 32, 4 heads, GELU MLP 64, on 8 row tokens."""
    return DigitsTransformer()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "resnet": make_resnet,
    "dscnn": make_dscnn,
    "transformer": make_transformer,
}


def shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in each direction, filling with zeros."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(3):
        for j in range(3):
            rows = (offsets[:, 0] == i) & (offsets[:, 1] == j)
            out[rows] = padded[rows, :, i:i + 8, j:j + 8]
    return out


def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of rows of ``x`` whose argmax logit is the label (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
          validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """Fit ``model`` in place: AdamW, one-cycle LR, shift augmentation, fixed epochs.

    With ``validation`` rows, the weights kept are those after the epoch of best validation
    accuracy (the earliest on ties); returns that epoch (1-based), else ``EPOCHS``.
    """
    best_epoch, best_accuracy, best_state = EPOCHS, -1.0, None
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, EPOCHS + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), BATCH):
            rows = order[start:start + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(shift_augment(x[rows], gen)), y[rows])
            loss.backward()
            opt.step()
            sched.step()
        if validation is not None:
            accuracy = accuracy_of(model, *validation)
            if accuracy > best_accuracy:
                best_epoch, best_accuracy = epoch, accuracy
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return best_epoch


KEEP_BATCHNORM = {"mlp", "cnn", "resnet", "dscnn"}
"""Models exported without constant folding, so that BatchNormalization stays a node. The
transformer is exported as users usually do, folded (its weights stored pre-transposed)."""


def export_onnx(model: nn.Module, name: str) -> onnx.ModelProto:
    """The trained model as a checked ONNX ModelProto (BatchNormalization kept as nodes in the
    models of :data:`KEEP_BATCHNORM`)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), buf,
            dynamo=False, opset_version=OPSET, do_constant_folding=name not in KEEP_BATCHNORM,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    materialize_identity_initializers(proto)
    proto.doc_string = f"qfx-onnx demo model '{name}' for 8x8 digits (models/train.py); see models/README.md"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def materialize_identity_initializers(proto: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of that initializer under the output name.

    The exporter deduplicates equal-valued initializers (e.g. a BN weight equal to its running
    variance) through Identity nodes; a separate copy keeps one tensor per role for the quantizer.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def save_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def ort_logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def describe(name: str, model: nn.Module, proto: onnx.ModelProto, accuracy: float, seconds: float) -> dict:
    """The accuracy.json entry of one model."""
    return {
        "file": f"{name}.onnx",
        "test_accuracy": round(accuracy, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "initializer_values": sum(int(np.prod(t.dims)) for t in proto.graph.initializer),
        "ops": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "train_seconds": round(seconds, 1),
    }


ARCHITECTURES = {
    "mlp": "Flatten, Gemm+ReLU 64-64-32, Gemm to 10 logits.",
    "cnn": "The main demo. [Conv 3x3 (with bias) + BatchNormalization + ReLU + MaxPool 2] x2 "
           "(16, 32 channels), Flatten, Gemm 128 -> 10.",
    "resnet": "Stem Conv+BN+ReLU (16), residual block 16 (identity shortcut), residual block 32 "
              "(stride 2, 1x1 Conv+BN projection shortcut), GlobalAveragePool, Gemm 32 -> 10.",
    "dscnn": "Stem Conv+BN+ReLU (16), depthwise 3x3 (group=16) + pointwise 1x1 to 32, AveragePool 2, "
             "depthwise 3x3 (group=32) + pointwise 1x1 to 64 (each Conv followed by BN+ReLU), "
             "GlobalAveragePool, Gemm 64 -> 10.",
    "transformer": "Encoder on 8 tokens (the image rows, 8 pixels each): MatMul+Add embedding to width 32 "
                   "plus a learned positional embedding, 2 pre-norm layers (LayerNormalization; 4-head softmax "
                   "attention written out as Q/K/V MatMul, Reshape/Transpose into heads, MatMul, Mul by "
                   "1/sqrt(8), Softmax, MatMul, merge, output MatMul; residual Add; LayerNormalization; MLP "
                   "32 -> 64 -> 32 with exact GELU as Div/Erf/Add/Mul; residual Add), final LayerNormalization, "
                   "ReduceMean over tokens, Gemm 32 -> 10. Kept weights: the epoch of best accuracy on a "
                   "stratified 15% validation part of the training split.",
}

README = """# Demo dataset and models

Generated by `models/train.py` from `models/accuracy.json`; do not edit by hand.

## Dataset: `digits.npz`

{attribution}

Keys (load with `numpy.load(path, allow_pickle=False)` or `qfx_onnx.data.load_dataset`):

| key | dtype | shape | meaning |
|---|---|---|---|
| `x` | float32 | ({n}, 1, 8, 8) | pixel counts 0..16 divided by 16 (exact multiples of 1/16 in [0, 1]) |
| `y` | int64 | ({n},) | digit labels 0..9 |
| `train_idx` | int64 | ({n_train},) | rows of the training split, sorted |
| `test_idx` | int64 | ({n_test},) | rows of the test split, sorted |
| `attribution` | str | () | the text above |

The split is fixed: 80/20, stratified by label, seeded (`SEED` in `make_dataset.py`), stored in the
file so every tool and test uses the same rows. Use it as `models/digits.npz` with split `train`
(calibration, finetuning) or `test` (accuracy).

## Models

All take `input` float32 (batch, 1, 8, 8) with a dynamic batch and return `logits` (batch, 10), no
softmax on the logits. ONNX opset {opset}; BatchNormalization nodes are kept (not folded into Conv). Accuracy is
the float model run in onnxruntime on the {n_test}-image test split.

| model | file | parameters | initializer values | ops | float test accuracy | train time (s) |
|---|---|---|---|---|---|---|
{rows}

Parameters count trainable weights; initializer values also count BatchNorm running statistics.

{architectures}

## Regenerate

```
pip install -e ".[dataset]"     # scikit-learn, needed only by make_dataset.py
python models/make_dataset.py && python models/train.py
```

`make_dataset.py` rewrites a byte-identical `digits.npz`. `train.py` is deterministic (one CPU
thread, fixed seeds, `torch.use_deterministic_algorithms(True)`, {epochs} epochs of AdamW with a
one-cycle learning rate and random one-pixel shifts); hyperparameters were fixed before looking at
the test split. The transformer trains on 85% of the training split and keeps the weights of the
epoch of best accuracy on the other 15% (stratified, seeded); the other models train on the whole
training split for the fixed epochs. It uses the TorchScript exporter (`torch.onnx.export(..., dynamo=False,
do_constant_folding=False)`; the transformer with constant folding on), checks each model with `onnx.checker` and compares onnxruntime with
torch. `tests/test_models_zoo.py` checks every model against `accuracy.json`.
"""


def render_readme(summary: dict, attribution: str) -> str:
    """README.md for ``summary`` (the accuracy.json content), rendered whole."""
    rows = []
    for name, info in summary["models"].items():
        ops = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in info["ops"].items())
        rows.append(f"| {name} | `{info['file']}` | {info['parameters']:,} | {info['initializer_values']:,} | {ops} "
                    f"| {100 * info['test_accuracy']:.2f}% | {info['train_seconds']:.0f} |")
    architectures = "\n".join(f"- **{name}**: {text}" for name, text in ARCHITECTURES.items())
    n_train, n_test = summary["train_samples"], summary["test_samples"]
    return README.format(
        attribution=attribution, n=n_train + n_test, n_train=n_train, n_test=n_test, opset=OPSET,
        rows="\n".join(rows), architectures=architectures, epochs=EPOCHS,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = HERE / "digits.npz"
    x_train, y_train = load_arrays(data, "train")
    x_test, y_test = load_arrays(data, "test")
    results = {}
    for index, (name, make) in enumerate(MODELS.items()):
        torch.manual_seed(SEED + index)
        model = make()
        x_fit, y_fit, validation = x_train, y_train, None
        if name in SELECTED_ON_VALIDATION:
            val_idx = validation_indices(len(y_train), VALIDATION_FRACTION, SEED, y_train)
            fit = torch.ones(len(y_train), dtype=torch.bool)
            fit[val_idx] = False
            x_fit, y_fit, validation = x_train[fit], y_train[fit], (x_train[val_idx], y_train[val_idx])
        start = time.perf_counter()
        epoch = train(model, x_fit, y_fit, SEED + index, validation)
        seconds = time.perf_counter() - start
        proto = export_onnx(model, name)
        model_bytes = proto.SerializeToString()
        logits = ort_logits(model_bytes, x_test.numpy())
        with torch.no_grad():
            reference = model(x_test).numpy()
        diff = float(np.abs(logits - reference).max())
        if diff > 1e-4:
            raise SystemExit(f"{name}: onnxruntime and torch logits differ by {diff:g}")
        accuracy = float((logits.argmax(1) == y_test.numpy()).mean())
        save_atomic(HERE / f"{name}.onnx", model_bytes)
        results[name] = describe(name, model, proto, accuracy, seconds)
        if validation is not None:
            results[name]["selected_epoch"] = epoch
            results[name]["validation_accuracy"] = round(accuracy_of(model, *validation), 4)
        log.info("%s: test accuracy %.2f%%, %d parameters, %.1f s, max |ort - torch| %.2g",
                 name, 100 * accuracy, results[name]["parameters"], seconds, diff)
    summary = {
        "dataset": "digits.npz",
        "split": "test",
        "test_samples": len(y_test),
        "train_samples": len(y_train),
        "models": results,
    }
    save_atomic(HERE / "accuracy.json", (json.dumps(summary, indent=2) + "\n").encode())
    attribution = str(np.load(data, allow_pickle=False)["attribution"])
    save_atomic(HERE / "README.md", render_readme(summary, attribution).encode())


if __name__ == "__main__":
    main()
