#!/usr/bin/env bash
# GPU check (issue 12): the CUDA code paths of cast, fused_cast, the quantizer, `finetune --device
# cuda` (eager and --compile), DDP over NCCL, and a GPU row of the QAT step benchmark.
#
#   OUT=/tmp/x bash benchmarks/gpu_check.sh        # from the repository root; at most about 6 minutes
#   OUT=/tmp/x JOBS=0 QAT_MODELS=cnn bash benchmarks/gpu_check.sh   # CPU dry run (no xdist, small model)
#
# Needs python with torch, onnx, onnxruntime, typer, rich, pytest, pytest-xdist, hypothesis, numpy;
# no network. The package need not be installed: it is tried as an editable install without deps
# (QFX_NO_INSTALL=1 skips that) and, failing that, imported from the checkout (PYTHONPATH, plus a
# link cli -> qfx_onnx_cli).
# Every step has its own time limit and its own log under $OUT; $OUT/results.md is the table.
# Without CUDA (a dry run) the CUDA tests skip and the runs use --device cpu and gloo.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/qfx_gpu_check}
mkdir -p "$OUT"
JOBS=${JOBS:-8}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/qfx_gpu_check_inductor}
export PYTHONDONTWRITEBYTECODE=1
RESULTS="$OUT/results.md"
T0=$(date +%s)
printf '| step | exit | seconds | log |\n|---|---|---|---|\n' > "$RESULTS"

run() {  # run NAME LIMIT_S CMD...: one step, its output in $OUT/NAME.log, a row in results.md
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s, $(( start - T0 )) s elapsed)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "TIMED OUT after ${limit}s" >> "$OUT/$name.log"
    printf '| %s | %s | %s | %s.log |\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$name" >> "$RESULTS"
    tail -n 3 "$OUT/$name.log"
}

# ---------------------------------------------------------------------------------- environment
{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    python - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "count", torch.cuda.device_count(),
          "nccl", torch.cuda.nccl.version())
EOF
    for m in onnx onnxruntime typer rich pytest xdist hypothesis numpy brevitas; do
        python -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>/dev/null || echo "$m: missing"
    done
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

# qfx_onnx and the CLI importable from this checkout, and a `qfx-onnx` executable (torchrun needs one)
SHIM=/tmp/qfx_gpu_check_shim
mkdir -p "$SHIM/bin"
if [ "${QFX_NO_INSTALL:-0}" != 1 ] && \
   ! python -c "import qfx_onnx_cli, qfx_onnx, sys; sys.exit(not qfx_onnx.__file__.startswith('$ROOT'))" 2>/dev/null; then
    pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || echo "editable install failed" >> "$OUT/install.log"
fi
if ! python -c "import qfx_onnx_cli, qfx_onnx, sys; sys.exit(not qfx_onnx.__file__.startswith('$ROOT'))" 2>/dev/null; then
    ln -sfn "$ROOT/cli" "$SHIM/qfx_onnx_cli"
    export PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "using the import shim $SHIM" >> "$OUT/install.log"
fi
cat > "$SHIM/bin/qfx-onnx" <<EOF
#!$(command -v python)
import sys
from qfx_onnx_cli.main import app
sys.argv[0] = "qfx-onnx"
app()
EOF
chmod +x "$SHIM/bin/qfx-onnx"
export PATH="$SHIM/bin:$PATH"
python -c "import qfx_onnx, qfx_onnx_cli; print('imports from', qfx_onnx.__file__, qfx_onnx_cli.__file__)" | tee -a "$OUT/install.log"

if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    DEV=cuda
    export QFX_REQUIRE_CUDA=1  # a CUDA test that skips fails instead
else
    DEV=cpu
    echo "no CUDA: dry run (CUDA tests skip, runs use the CPU)"
fi
XDIST=()
[ "$JOBS" -gt 0 ] && XDIST=(-n "$JOBS")

# -------------------------------------------------------------------------------------- tests
# every test that needs CUDA (they fail under QFX_REQUIRE_CUDA=1 rather than skip) ...
run cuda_tests 120 python -m pytest -q -p no:cacheprovider -rs -k cuda \
    tests/test_fixed_cast.py tests/test_quantizer.py tests/test_fused.py tests/test_finetune.py tests/test_finetune_cli.py
# ... and the cast, quantizer, fused, K-hot and ONNX-cast files in full on this machine
run cast_test_files 150 python -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
    tests/test_fixed_cast.py tests/test_quantizer.py tests/test_fused.py tests/test_khot.py tests/test_onnx_cast.py

# ------------------------------------------------------------------------------ finetune runs
DATA=models/digits.npz
run quantize_cnn 60 qfx-onnx quantize models/cnn.onnx --data "$DATA" -o "$OUT/cnn.qfx.onnx" --force
run finetune_$DEV 90 qfx-onnx finetune "$OUT/cnn.qfx.onnx" --data "$DATA" -o "$OUT/cnn.$DEV.qfx.onnx" \
    --epochs 3 --device "$DEV" --checkpoint-dir /tmp/qfx_gpu_check_ckpt_eager --force --json
# DDP: torchrun with NCCL on CUDA (gloo on CPU). One process: setup() gives rank r the GPU
# cuda:<LOCAL_RANK> and NCCL refuses two ranks on one GPU, so two processes need two GPUs.
run ddp_$DEV 90 torchrun --standalone --nproc-per-node 1 --no-python qfx-onnx finetune "$OUT/cnn.qfx.onnx" \
    --data "$DATA" -o "$OUT/cnn.ddp.qfx.onnx" --epochs 2 --device "$DEV" --checkpoint-dir /tmp/qfx_gpu_check_ckpt_ddp --force --json

# ------------------------------------------------------------------------ QAT step benchmark
# float vs QAT, eager and torch.compile, ResNet-20 at batch 256, on the device (QAT_MODELS="cnn"
# for a quick CPU dry run: compiling ResNet-20 on a small CPU takes minutes)
read -r -a QAT_MODELS <<< "${QAT_MODELS:-resnet20}"
run qat_bench_eager_$DEV 90 python benchmarks/bench_qat.py --steps-only --step-device "$DEV" \
    --step-models "${QAT_MODELS[@]}" --step-batches 256 --step-modes float qat frozen \
    --step-count 5 --step-repeats 3 --out "$OUT/qat_steps_eager.md" --json "$OUT/qat_steps_eager.json"
# compiling the QAT ResNet-20 takes minutes: whatever is left of a 330 s budget
LEFT=$(( 330 - ($(date +%s) - T0) ))
[ "$LEFT" -lt 45 ] && LEFT=45
run qat_bench_compiled_$DEV "$LEFT" python benchmarks/bench_qat.py --steps-only --step-device "$DEV" \
    --step-models "${QAT_MODELS[@]}" --step-batches 256 --step-modes float float_compiled qat_compiled \
    --step-count 5 --step-repeats 3 --out "$OUT/qat_steps_compiled.md" --json "$OUT/qat_steps_compiled.json"

# finetune --compile end to end, if the time budget (6 minutes in all) leaves room
LEFT=$(( 350 - ($(date +%s) - T0) ))
if [ "$LEFT" -ge 45 ]; then
    run finetune_compile_$DEV "$LEFT" qfx-onnx finetune "$OUT/cnn.qfx.onnx" --data "$DATA" -o "$OUT/cnn.compiled.qfx.onnx" \
        --epochs 2 --device "$DEV" --compile --checkpoint-dir /tmp/qfx_gpu_check_ckpt_compiled --force --json
else
    printf '| finetune_compile_%s | skipped: under 45 s of the budget left | - | - |\n' "$DEV" >> "$RESULTS"
fi

{
    echo
    echo "device: $DEV; total $(( $(date +%s) - T0 )) s"
    echo
    for f in "$OUT"/qat_steps_eager.md "$OUT"/qat_steps_compiled.md; do [ -f "$f" ] && cat "$f"; done
} >> "$RESULTS"
cat "$RESULTS"
