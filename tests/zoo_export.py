"""Export the zoo architectures (:mod:`zoo_arch`) to ONNX with both torch exporters.

A :class:`Variant` is one architecture exported one way: ``exporter`` is ``"ts"`` (TorchScript,
``torch.onnx.export(..., dynamo=False)`` at ``opset``) or ``"dynamo"`` (``dynamo=True`` at the
installed torch's default opset, weights inline); ``batch`` is the fixed batch size written into
the model, or None for a dynamic batch dimension. The graph input is named ``x``.

:func:`exported` writes each variant at most once per pytest session into a folder shared by the
xdist workers (a file lock per variant, written atomically), so the tests of one variant on two
workers reuse one file. Exports are deterministic: the same variant gives the same bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
import torch

from zoo_arch import ZOO

INPUT_NAME = "x"
OUTPUT_NAME = "y"
DEFAULT_TS_OPSET = 17


@dataclass(frozen=True)
class Variant:
    """One export of one architecture; ``id`` is its pytest id, e.g. ``resnet20-ts17-b1``."""

    arch: str
    exporter: str  # "ts" or "dynamo"
    batch: int | None  # None: dynamic batch
    opset: int | None = None  # TorchScript only; dynamo uses torch's default
    fold: bool = True  # TorchScript's do_constant_folding (False keeps BatchNormalization and shape arithmetic)

    @property
    def id(self) -> str:
        how = (f"ts{self.opset}" + ("" if self.fold else "nofold")) if self.exporter == "ts" else "dynamo"
        return f"{self.arch}-{how}-{'dyn' if self.batch is None else f'b{self.batch}'}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return ZOO[self.arch].input_shape


def _variants() -> list[Variant]:
    """Every architecture with both exporters, at fixed batch 1 and dynamic batch; a few extras at
    batch 2, at the older opsets 11 and 13, and without constant folding (both exporters fold
    eval-mode BatchNorm into the conv before it, and both drop eval-mode Dropout)."""
    out: list[Variant] = []
    for arch in ZOO:
        out += [
            Variant(arch, "ts", 1, DEFAULT_TS_OPSET),
            Variant(arch, "ts", None, DEFAULT_TS_OPSET),
            Variant(arch, "dynamo", 1),
            Variant(arch, "dynamo", None),
        ]
    out += [
        Variant("resnet18", "ts", 2, DEFAULT_TS_OPSET),
        Variant("jet_mlp_bn", "dynamo", 2),
        Variant("shufflenet_v2", "dynamo", 2),
        Variant("squeezenet", "ts", None, 11),
        Variant("shufflenet_v2", "ts", 1, 11),
        Variant("mobilenet_v3_small", "ts", None, 13),
        Variant("conv1d", "ts", 2, 13),
        Variant("resnet18", "ts", None, DEFAULT_TS_OPSET, fold=False),
        Variant("shufflenet_v2", "ts", 1, DEFAULT_TS_OPSET, fold=False),
    ]
    return out


VARIANTS: list[Variant] = _variants()


def build(arch: str) -> torch.nn.Module:
    """The architecture's model, built without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        return ZOO[arch].builder()


def export_bytes(variant: Variant) -> bytes:
    """The serialized ONNX model of ``variant`` (weights inline)."""
    model = build(variant.arch)
    example_batch = variant.batch if variant.batch is not None else 2
    gen = torch.Generator().manual_seed(0)
    example = torch.rand((example_batch, *variant.input_shape), generator=gen)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if variant.exporter == "ts":
            return _export_torchscript(model, example, variant)
        return _export_dynamo(model, example, variant)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, variant: Variant) -> bytes:
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if variant.batch is None else None
    torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=variant.opset,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                      do_constant_folding=variant.fold)
    return buffer.getvalue()


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, variant: Variant) -> bytes:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if variant.batch is None else None
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
    proto = program.model_proto
    return proto.SerializeToString()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this session sees (the session's base temp otherwise)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / "zoo_exports"
    folder.mkdir(exist_ok=True)
    return folder


def cached(folder: Path, name: str, make) -> Path:
    """``folder/name``, produced once by ``make(path)`` under a lock; ``make`` raising is cached too
    (as the exception's text) so every test of a failing step fails the same way, once."""
    path = folder / name
    failed = folder / (name + ".error")
    with _locked(folder / (name + ".lock")):
        if not path.exists() and not failed.exists():
            tmp = folder / (name + ".tmp")
            try:
                make(tmp)
            except Exception as exc:  # noqa: BLE001 - recorded and re-raised by every caller
                failed.write_text(f"{type(exc).__name__}: {exc}")
                raise
            tmp.replace(path)
    if failed.exists():
        raise RuntimeError(f"{name} could not be produced earlier in this session: {failed.read_text()}")
    return path


def exported(tmp_path_factory, variant: Variant) -> Path:
    """The ONNX file of ``variant``, exported once per session (see the module docstring)."""
    def make(tmp: Path) -> None:
        tmp.write_bytes(export_bytes(variant))

    return cached(shared_dir(tmp_path_factory), f"{variant.id}.onnx", make)


def input_batch_dim(path: Path) -> int | str | None:
    """The batch dimension written in the model's first input: an int, a dim_param, or None."""
    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None
