"""The intermediate representation: a torch.fx graph whose call_function targets are IR ops."""

from qfx_onnx.ir.ops import IR_OPS, HlsForm, IrOp, NoHls, OpDef, ir_op, op_of

__all__ = ["IR_OPS", "HlsForm", "IrOp", "NoHls", "OpDef", "ir_op", "op_of"]
