"""Regenerate ``tests/data/brevitas_cnn.onnx``: a small CNN exported to QONNX by Brevitas.

8-bit signed input, two 3x3 convs and a dense layer with 4-bit per-output-channel power-of-two
weights (Brevitas ``Int8WeightPerTensorFixedPoint`` made per channel; the channels' weights are
scaled by 2**-c so their scales differ), 4-bit unsigned power-of-two ReLU activations, a max pool.
The file is committed so that the import tests need no Brevitas; to rebuild it (Brevitas must not
pull another torch):

    pip install --no-deps brevitas==0.13.4 "dependencies==2.0.1" unfoldNd onnxoptimizer
    python tests/make_brevitas_cnn.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "data" / "brevitas_cnn.onnx"


def build() -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Uint8ActPerTensorFixedPoint

    class WeightPoTPerChannel(Int8WeightPerTensorFixedPoint):
        scaling_per_output_channel = True

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, bit_width=8, return_quant_tensor=True)
            self.c1 = qnn.QuantConv2d(1, 4, 3, padding=1, weight_quant=WeightPoTPerChannel, weight_bit_width=4, bias=False)
            self.r1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=4, return_quant_tensor=True)
            self.c2 = qnn.QuantConv2d(4, 4, 3, padding=1, weight_quant=WeightPoTPerChannel, weight_bit_width=4, bias=False)
            self.r2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=4, return_quant_tensor=True)
            self.pool = nn.MaxPool2d(2)
            self.fc = qnn.QuantLinear(4 * 4 * 4, 10, weight_quant=WeightPoTPerChannel, weight_bit_width=4, bias=False)

        def forward(self, x):
            x = self.inp(x)
            x = self.r1(self.c1(x))
            x = self.pool(self.r2(self.c2(x)))
            return self.fc(torch.flatten(x, 1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for layer in (net.c1, net.c2, net.fc):
            for c in range(layer.weight.shape[0]):
                layer.weight[c] *= 2.0 ** -(c % 4)
        net.train()
        net(torch.rand(16, 1, 8, 8))  # let the activation scales settle
    return net.eval()


def main() -> None:
    from brevitas.export import export_qonnx

    import onnx

    OUT.parent.mkdir(exist_ok=True)
    export_qonnx(build(), torch.rand(1, 1, 8, 8), str(OUT))
    model = onnx.load(str(OUT))  # the exporter puts the weights in a .data file: make it one file
    Path(str(OUT) + ".data").unlink(missing_ok=True)
    onnx.save(model, str(OUT), save_as_external_data=False)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
