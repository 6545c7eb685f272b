"""Real architectures end to end: import, quantize + verify, finetune, export-hls.

Each zoo architecture (:mod:`zoo_arch`) is exported with both torch exporters, at a fixed batch and
with a dynamic batch (:mod:`zoo_export`), and every export goes through the whole pipeline:

1. the imported graph matches onnxruntime on the same inputs, at a batch other than the declared
   one (onnxruntime runs a fixed-batch export chunk by chunk);
2. ``quantize`` calibrates on 32 samples and the annotated ONNX, run in onnxruntime, matches the
   emulation bit for bit wherever float32 guarantees it (``verify_annotated``);
3. one finetuning step (one epoch of one batch) with integer labels, MSE for the autoencoder;
4. ``export-hls`` generates the project; C-simulation for the models under a million MACs, on one
   export of each architecture (compiling is what costs).

The CLI runs the full ``quantize -> finetune -> export-hls`` path on a few variants.
Exported files, data and annotated models are made once per session and shared by the xdist
workers (see :func:`zoo_export.cached`).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from qfx_onnx.hls.project import export_hls
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.annotated import read_annotated, verify_annotated, write_annotated
from qfx_onnx.quant.api import quantize
from qfx_onnx.quant.quantize import FixedPointModel
from qfx_onnx.train import FinetuneConfig, finetune
from qfx_onnx_cli.main import app
from zoo_arch import ZOO, count_macs
from zoo_export import VARIANTS, Variant, build, cached, export_bytes, exported, input_batch_dim, shared_dir

N_TRAIN = 32
N_TEST = 16
IMPORT_BATCH = 3  # differs from every declared batch (1, 2) and from the dynamic exports' example (2)
VERIFY_SAMPLES = 8
FINETUNE_SAMPLES = 16
FINETUNE_EVAL = 4
HLS_VECTORS = 4
SLOW_ARCHS = {"resnet20"}
# C-simulation compiles a project per test: one export per small architecture, alternating exporters
CSIM_VARIANTS = {
    "resnet18-ts17-b1", "mobilenet_v2-dynamo-dyn", "mobilenet_v3_small-ts17-dyn", "squeezenet-dynamo-b1",
    "shufflenet_v2-ts17-b1", "efficientnet_b0-dynamo-dyn", "vgg-ts17-dyn", "jet_mlp-dynamo-b1",
    "jet_mlp_bn-ts17-b1", "conv1d-dynamo-dyn", "autoencoder-ts17-dyn",
}


def _param(variant: Variant, slow: bool = False):
    marks = [pytest.mark.slow] if slow or variant.arch in SLOW_ARCHS else []
    return pytest.param(variant, id=variant.id, marks=marks)


PARAMS = [_param(v) for v in VARIANTS]
pytestmark = pytest.mark.usefixtures("one_thread")  # two xdist workers on two cores: no oversubscription


# ------------------------------------------------------------------------------------------ data
def make_data(arch: str) -> dict[str, np.ndarray]:
    """Deterministic real-ish inputs for ``arch`` (smooth images, noisy sines, Gaussian features),
    labelled by the float model: class indices, or the input itself for the autoencoder."""
    entry = ZOO[arch]
    rng = np.random.default_rng(zlib.crc32(arch.encode()))
    n = N_TRAIN + N_TEST
    shape = entry.input_shape
    if len(shape) == 3:  # images in [0, 1]: a coarse random pattern, upsampled, plus fine noise
        c, h, w = shape
        coarse = rng.random((n, c, h // 4, w // 4))
        x = np.kron(coarse, np.ones((1, 1, 4, 4))) + 0.1 * rng.standard_normal((n, c, h, w))
        x = np.clip(x, 0.0, 1.0)
    elif len(shape) == 2:  # signals: a sine per channel, random frequency and phase, plus noise
        c, length = shape
        t = np.arange(length) / length
        freq = rng.uniform(1, 8, (n, c, 1))
        phase = rng.uniform(0, 2 * np.pi, (n, c, 1))
        x = np.sin(2 * np.pi * freq * t + phase) + 0.2 * rng.standard_normal((n, c, length))
    else:
        x = rng.standard_normal((n, *shape))
    x = x.astype(np.float32)
    if entry.task == "regression":
        y = x.copy()
    else:
        with torch.no_grad():
            y = build(arch)(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)
    return dict(x=x, y=y, train_idx=np.arange(N_TRAIN), test_idx=np.arange(N_TRAIN, n))


def data_file(tmp_path_factory, arch: str) -> Path:
    """``<arch>.npz`` (x, y, train_idx, test_idx), made once per session."""
    return cached(shared_dir(tmp_path_factory), f"{arch}.npz",
                  lambda tmp: _savez(tmp, make_data(arch)))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # np.savez appends .npz to a bare path name
        np.savez(handle, **arrays)


def load_data(tmp_path_factory, arch: str) -> dict[str, np.ndarray]:
    with np.load(data_file(tmp_path_factory, arch), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------ quantized
_QUANTIZED: dict[str, FixedPointModel] = {}  # models quantized in this process, by variant id


def quantized_file(tmp_path_factory, variant: Variant) -> Path:
    """The annotated ONNX of ``variant`` (8-bit defaults, max calibration on 32 training samples)."""
    def make(tmp: Path) -> None:
        x = torch.from_numpy(load_data(tmp_path_factory, variant.arch)["x"][:N_TRAIN])
        model = quantize(exported(tmp_path_factory, variant), x, calib_samples=N_TRAIN)
        write_annotated(model, tmp, source=f"{variant.id}.onnx")
        _QUANTIZED[variant.id] = model

    return cached(shared_dir(tmp_path_factory), f"{variant.id}.qfx.onnx", make)


def run_ort_in_chunks(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime on ``x``: at once for a dynamic batch, else chunk by chunk at the declared batch."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    batch = input_batch_dim(path)
    name = session.get_inputs()[0].name
    if not isinstance(batch, int):
        return session.run(None, {name: x})[0]
    assert len(x) % batch == 0
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------------------- tests
def test_zoo_table_is_consistent() -> None:
    """Pinned MAC counts agree with the architectures; every architecture has exports of both
    kinds at a fixed and a dynamic batch."""
    for name, entry in ZOO.items():
        model = build(name)
        assert not model.training, name
        assert count_macs(model, entry.input_shape) == entry.macs, name
        assert entry.task in ("classification", "regression")
        kinds = {(v.exporter, v.batch is None) for v in VARIANTS if v.arch == name}
        assert {e for e, _ in kinds} == {"ts", "dynamo"} and {d for _, d in kinds} == {False, True}, name
        if entry.small:
            assert kinds == {("ts", False), ("ts", True), ("dynamo", False), ("dynamo", True)}, name
    assert ZOO["resnet20"].macs > 40_000_000 and not ZOO["resnet20"].small
    assert sum(p.numel() for p in build("resnet20").parameters()) == 272_474  # He et al.: 0.27 M


def test_batchnorm_is_not_identity() -> None:
    for name in ("resnet20", "jet_mlp_bn"):
        bns = [m for m in build(name).modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns, name
        for bn in bns:
            assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)), name
            assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean)), name


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.arch == "jet_mlp_bn" and v.batch is None],
                         ids=lambda v: v.id)
def test_exports_are_deterministic(tmp_path_factory, variant: Variant) -> None:
    assert export_bytes(variant) == exported(tmp_path_factory, variant).read_bytes()


@pytest.mark.parametrize("variant", PARAMS)
def test_import_matches_onnxruntime(tmp_path_factory, variant: Variant) -> None:
    path = exported(tmp_path_factory, variant)
    declared = input_batch_dim(path)
    assert declared == variant.batch or (variant.batch is None and isinstance(declared, str))
    n = 2 * variant.batch if variant.batch and variant.batch > 1 else IMPORT_BATCH
    x = load_data(tmp_path_factory, variant.arch)["x"][:n]
    want = run_ort_in_chunks(path, x)
    gm = load_onnx(path)
    kept = getattr(gm.onnx_info, "fixed_batch", None)
    assert kept is None, f"the imported graph is still fixed to batch {kept}; it cannot run {n} samples at once"
    with torch.no_grad():
        got = gm(torch.from_numpy(x))
    got = got.detach().to(torch.float64).numpy()
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("variant", PARAMS)
def test_quantize_verifies_bit_exact(tmp_path_factory, variant: Variant) -> None:
    path = quantized_file(tmp_path_factory, variant)
    model = _QUANTIZED.get(variant.id)
    model = model if model is not None else read_annotated(path)
    x = torch.from_numpy(load_data(tmp_path_factory, variant.arch)["x"][N_TRAIN:N_TRAIN + VERIFY_SAMPLES])
    check = verify_annotated(model, path, x)
    assert len(check.layers) > 0
    assert not check.unexpected, check.summary() + ": " + ", ".join(check.unexpected[:5])
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == VERIFY_SAMPLES and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", PARAMS)
def test_finetune_one_step(tmp_path_factory, tmp_path: Path, variant: Variant) -> None:
    task = ZOO[variant.arch].task
    model = read_annotated(quantized_file(tmp_path_factory, variant))
    data = load_data(tmp_path_factory, variant.arch)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    train = TensorDataset(x[:FINETUNE_SAMPLES], y[:FINETUNE_SAMPLES])
    test = TensorDataset(x[N_TRAIN:N_TRAIN + FINETUNE_EVAL], y[N_TRAIN:N_TRAIN + FINETUNE_EVAL])
    config = FinetuneConfig(epochs=1, batch_size=FINETUNE_SAMPLES, lr_schedule="none", task=task, seed=0)
    result = finetune(model, train, test, config)
    assert result.epochs_run == 1
    assert math.isfinite(result.history[-1]["train_loss"])
    assert result.final is not None and all(math.isfinite(v) for v in result.final.values())
    out = tmp_path / "ft.qfx.onnx"
    write_annotated(result.model, out)
    assert read_annotated(out) is not None


@pytest.mark.parametrize("variant", [_param(v, slow=v.id in CSIM_VARIANTS) for v in VARIANTS])
def test_export_hls(tmp_path_factory, tmp_path: Path, variant: Variant) -> None:
    csim = variant.id in CSIM_VARIANTS
    assert not csim or ZOO[variant.arch].small
    model = read_annotated(quantized_file(tmp_path_factory, variant))
    x = torch.from_numpy(load_data(tmp_path_factory, variant.arch)["x"][N_TRAIN:N_TRAIN + HLS_VECTORS])
    result = export_hls(model, tmp_path / "hls", top=variant.arch, data=(x,), n_vectors=HLS_VECTORS, csim=csim, jobs=1)
    assert result.model.layers
    assert (result.project / "firmware" / f"{result.model.top}.cpp").is_file()
    if csim:
        assert result.csim is not None and result.csim.passed, result.csim.output[-2000:]


def test_csim_covers_every_small_architecture() -> None:
    ids = {v.id for v in VARIANTS}
    assert CSIM_VARIANTS <= ids
    assert {v.split("-")[0] for v in CSIM_VARIANTS} == {name for name, e in ZOO.items() if e.small}


# -------------------------------------------------------------------------------------------- CLI
CLI_VARIANTS = ["jet_mlp_bn-ts17-b1", "shufflenet_v2-dynamo-dyn", "autoencoder-dynamo-dyn"]
CLI_CSIM = {"jet_mlp_bn-ts17-b1", "autoencoder-dynamo-dyn"}


def _invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"qfx-onnx {' '.join(map(str, args[:1]))} exited {result.exit_code}:\n{result.output[-3000:]}"
    return result.output


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.id in CLI_VARIANTS], ids=lambda v: v.id)
def test_cli_quantize_finetune_export(tmp_path_factory, tmp_path: Path, variant: Variant) -> None:
    """The real commands, one after the other, on the files the previous one wrote."""
    model = tmp_path / f"{variant.arch}.onnx"
    model.write_bytes(exported(tmp_path_factory, variant).read_bytes())
    npz = data_file(tmp_path_factory, variant.arch)
    task = ZOO[variant.arch].task
    qfx, ft, hls = tmp_path / "q.qfx.onnx", tmp_path / "ft.qfx.onnx", tmp_path / "hls"
    out = _invoke("quantize", model, "--data", npz, "-o", qfx, "--calib-samples", N_TRAIN, "--verify-samples", N_TEST)
    assert "verify:" in out and "bit for bit" in out
    _invoke("finetune", qfx, "--data", npz, "-o", ft, "--task", task, "--epochs", 1, "--batch-size", N_TRAIN,
            "--lr-schedule", "none", "--quiet")
    csim = ["--csim", "--jobs", 1] if variant.id in CLI_CSIM else []  # shufflenet_v2 has its csim above
    out = _invoke("export-hls", ft, "-o", hls, "--test-vectors", HLS_VECTORS, "--data", npz, *csim)
    assert (hls / "build.tcl").is_file()
    if csim:
        assert "csim: bit-exact with the PyTorch emulation" in out and "0 mismatches" in out
    else:
        assert "csim" not in out  # generation only: nothing compiled, nothing claimed
