#!/usr/bin/env bash
# GPU checks (issue 15, part 5), each part in its own timeout, every part run even if one fails:
#   a. tests/test_dtype_device.py on the device (every method in float32/bfloat16/float16), then its
#      block-sparse tests again with TOKENSIFT_TRITON=1 (the Triton kernel instead of the engine);
#   b. benchmarks/block_sparse_kernel.py: the Triton kernel against the PyTorch engine (error, ms), in
#      bfloat16 and float32;
#   c. a short benchmarks/long_context.py: random weights of qwen2.5-coder-0.5b's architecture
#      (benchmarks/configs/qwen2.5-coder-0.5b.json), bf16, 8k/16k/32k, budget 1024, dense against the
#      four sparse-decode and three sparse-prefill methods, 5 repeats; then the prefill part again
#      with the Triton kernel switched on (TOKENSIFT_TRITON=1);
#   d. benchmarks/decode_vs_generate.py (if present): tokensift's dense decode loop against
#      transformers' generate, 512/4k/16k, 256 new tokens, on the same random-weight model.
# Everything is written under $OUT (log.txt and one JSON per benchmark). About 9-10 minutes on an
# H200; a part cut by its timeout keeps what its JSON recorded (benchmarks write after every cell).
#
#   OUT=/tmp/gpu scripts/gpu_check.sh                 # on a CUDA machine
#   DEVICE=cpu SMOKE=1 OUT=/tmp/gpu scripts/gpu_check.sh   # tiny sizes on the CPU: catches typos
#
# Needs torch, transformers, numpy and pytest (Triton for b); not gguf: no GGUF is read. Missing pure
# Python dependencies can be given as wheels in $WHEELS (installed with pip --target, no index).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TOKENSIFT_CACHE=${TOKENSIFT_CACHE:-/tmp/tokensift-cache}
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu-check-site"
fi

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
part() {  # part NAME SECONDS COMMAND...: run with a timeout, log the exit status, never stop the script
  local name=$1 limit=$2
  shift 2
  log "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "== $name: exit $rc after $((SECONDS - t0)) s"
}

if [ "$SMOKE" = 1 ]; then
  CONFIG="$OUT/tiny_config.json"
  "$PY" -c 'import json,sys; json.dump({"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "use_sliding_window": False},
    open(sys.argv[1], "w"))' "$CONFIG"
  LENGTHS="256 512"; BUDGET=64; REPEATS=2; NEW=4; KLEN="256"; DVG_LENGTHS="64 128"; DVG_NEW=4
  TESTS_K="float32 and (quest or snapkv or a_shape or block_sparse or refuses)"
else
  CONFIG=benchmarks/configs/qwen2.5-coder-0.5b.json
  LENGTHS="8192 16384 32768"; BUDGET=1024; REPEATS=5; NEW=32; KLEN="8192 16384 32768"
  DVG_LENGTHS="512 4096 16384"; DVG_NEW=256
  TESTS_K=""
fi

log "gpu_check: DEVICE=$DEVICE SMOKE=$SMOKE OUT=$OUT git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1

# a. the dtype/device tests on the device, then the block-sparse ones through the Triton kernel
part tests 90 env TOKENSIFT_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_dtype_device.py ${TESTS_K:+-k "$TESTS_K"} --junitxml="$OUT/tests.xml"
if [ "$DEVICE" != cpu ]; then
  part tests_triton 45 env TOKENSIFT_TEST_DEVICE="$DEVICE" TOKENSIFT_TRITON=1 "$PY" -m pytest -q \
    -p no:cacheprovider tests/test_dtype_device.py -k block_sparse
fi

# c. the short long-context benchmark (before b: it is the headline figure)
part long_context 180 "$PY" benchmarks/long_context.py --random-weights "$CONFIG" --device "$DEVICE" \
  --dtype bfloat16 --lengths $LENGTHS --budgets $BUDGET --parts decode prefill --repeats $REPEATS \
  --new-tokens $NEW --out "$OUT/long_context.json"
if [ "$DEVICE" != cpu ]; then
  part long_context_triton 60 env TOKENSIFT_TRITON=1 "$PY" benchmarks/long_context.py --random-weights "$CONFIG" \
    --device "$DEVICE" --dtype bfloat16 --lengths $LENGTHS --parts prefill --repeats $REPEATS \
    --out "$OUT/long_context_prefill_triton.json"
fi

# b. the Triton kernel against the PyTorch engine
if [ "$DEVICE" != cpu ]; then
  part kernel 50 "$PY" benchmarks/block_sparse_kernel.py --lengths $KLEN --out "$OUT/block_sparse_kernel.json"
  part kernel_fp32 30 "$PY" benchmarks/block_sparse_kernel.py --dtype float32 --lengths 8192 16384 \
    --out "$OUT/block_sparse_kernel_fp32.json"
fi

# d. tokensift's decode loop against transformers' generate (another part of the issue; if present)
if [ -f benchmarks/decode_vs_generate.py ]; then
  part decode_vs_generate 100 "$PY" benchmarks/decode_vs_generate.py --random-weights "$CONFIG" \
    --device "$DEVICE" --dtype bfloat16 --lengths $DVG_LENGTHS --new-tokens $DVG_NEW --repeats 3 \
    --out "$OUT/decode_vs_generate.json"
else
  log "== decode_vs_generate: benchmarks/decode_vs_generate.py is not there; skipped"
fi
log "gpu_check: done"
