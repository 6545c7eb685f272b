"""The intermediate representation: a torch.fx graph whose call_function targets are IR ops."""

from qfx_onnx.ir import transformer_ops  # noqa: F401 - registers the transformer ops
from qfx_onnx.ir.ops import IR_OPS, IrOp, ir_op

__all__ = ["IR_OPS", "IrOp", "ir_op"]
