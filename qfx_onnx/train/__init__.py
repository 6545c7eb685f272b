"""Quantization-aware finetuning with learned binary points (QFX), K-hot weights, checkpoints and DDP."""

from qfx_onnx.train.finetune import (
    Callback, FinetuneConfig, FinetuneInterrupted, FinetuneResult, evaluate, finetune,
)

__all__ = ["Callback", "FinetuneConfig", "FinetuneInterrupted", "FinetuneResult", "evaluate", "finetune"]
