"""Training step time of QAT against float training, side by side in one process (``bench_qat.py``).

A step is forward + backward + Adam with cross-entropy, one intra-op thread, float32, every binary
point learnable. Modes, timed in interleaved rounds so that machine load hits each alike:

- ``float``: the imported graph with every cast off; ``qat``: every cast on (eager);
- ``float_compiled`` / ``qat_compiled``: the same models under ``torch.compile`` (what
  ``finetune --compile`` does); ``frozen``: casts on, binary points not learned;
- ``brevitas``: a Brevitas 0.13.4 twin of the same architecture (8-bit power-of-two scales on
  weights and activations), when brevitas is installed and the model has a twin;
- ``torch_float``: the native float ``nn.Module`` the twin is built on (its baseline: the imported
  graph and the native module are different programs of the same arithmetic and differ in speed).
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qfx_onnx.fxcopy import copy_module
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.policy import Policy
from qfx_onnx.quant.quantize import quantize_graph

ROOT = Path(__file__).resolve().parent.parent


def resnet20_float() -> nn.Module:
    sys.path.insert(0, str(ROOT))
    from tests.zoo_arch import resnet20

    return resnet20()


def resnet20_fixed(calib: torch.Tensor, bits: int = 8):
    """CIFAR ResNet-20 (tests/zoo_arch.py) exported to ONNX, imported and PTQ'd at ``bits`` bits."""
    model = resnet20_float()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "resnet20.onnx"
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        gm = load_onnx(path)
    policy = Policy(weight_bits=bits, act_bits=bits, elementwise_bits=bits)
    return quantize_graph(gm, [calib], policy, method="max")


def brevitas_twin(model: nn.Module) -> nn.Module | None:
    """``model`` with Conv2d/Linear/ReLU replaced by Brevitas layers with 8-bit power-of-two
    (fixed-point) scales on weights and activations, an input quantizer in front; None without
    brevitas. BatchNorm and the residual adds stay float (Brevitas quantizes layer inputs/outputs)."""
    try:
        import brevitas.nn as qnn
        from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Uint8ActPerTensorFixedPoint
    except ImportError:
        return None
    twin = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = qnn.QuantConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                      child.padding, groups=child.groups, bias=child.bias is not None,
                                      weight_quant=Int8WeightPerTensorFixedPoint, return_quant_tensor=False)
            elif isinstance(child, nn.Linear):
                new = qnn.QuantLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                      weight_quant=Int8WeightPerTensorFixedPoint, return_quant_tensor=False)
            elif isinstance(child, nn.ReLU):
                new = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, return_quant_tensor=False)
            else:
                swap(child)
                continue
            if hasattr(child, "weight"):
                new.weight.data.copy_(child.weight.data)
                if child.bias is not None:
                    new.bias.data.copy_(child.bias.data)
            setattr(parent, name, new)

    swap(twin)
    return nn.Sequential(qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=False), twin)


def step_times(fixed, xs: list[torch.Tensor], ys: list[torch.Tensor], modes: list[str], repeats: int = 5,
               float_module: nn.Module | None = None) -> dict[str, float]:
    """Median seconds per training step of each mode (see the module docstring)."""
    torch.set_num_threads(1)
    runners: dict[str, Callable[[], float]] = {}
    for mode in modes:
        if mode in ("brevitas", "torch_float"):
            twin = brevitas_twin if mode == "brevitas" else copy.deepcopy
            net = twin(float_module) if float_module is not None else None
            if net is None:
                continue
        else:
            net = copy_module(fixed)
            net.set_casts_enabled(not mode.startswith("float"))
            for quant in net.quantizers().values():
                quant.frac.requires_grad_(mode.startswith("qat"))
        net = net.float().train()
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        fwd = torch.compile(net) if mode.endswith("compiled") else net
        runners[mode] = _runner(fwd, opt, xs, ys)
    samples: dict[str, list[float]] = {mode: [] for mode in runners}
    for mode, run in runners.items():
        start = time.perf_counter()
        run()  # warm-up (and the compile)
        print(f"  {mode}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(repeats):  # interleaved, so that machine load hits every mode alike
        for mode, run in runners.items():
            samples[mode].append(run())
    return {mode: statistics.median(v) for mode, v in samples.items()}


def _runner(net, opt, xs, ys) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for xb, yb in zip(xs, ys):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if xs[0].is_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(xs)
    return run
