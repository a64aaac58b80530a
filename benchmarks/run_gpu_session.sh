#!/usr/bin/env bash
# Everything a lent GPU session runs for the Triton backends, in one call:
#   1. benchmarks/bench_triton_gpu.py (correctness at real sizes, then the timings);
#   2. tests/test_triton.py compiled on the GPU (the CI leg runs it in the interpreter),
#      with a kernel falling back to its simpler path turned into a failure, and
#      tests/test_triton_large.py (tensors past 2^31 entries: GPU only).
#
#   bash benchmarks/run_gpu_session.sh [OUT_DIR]      # from the repository root
#
# OUT_DIR defaults to $OUT (the device tool's folder) or benchmarks/results. Each step
# has its own time limit (BENCH_LIMIT_S, TESTS_LIMIT_S seconds), so one slow step
# cannot take the other's time; logs are tee'd, so a step cut short still leaves its
# output. BENCH_ARGS adds arguments to the bench (e.g. "--check-lengths 512,2048").
# Packages the machine lacks (TransformerLens and what it imports: datasets,
# dill, multiprocess) can be carried as wheels in .whl/ (see docs/performance.md);
# .whl/optional/pyarrow-*.whl is installed only when the machine's pyarrow is older
# than datasets needs. Wheels in .whl/scan_only/ (mamba_ssm built without its CUDA
# extension, and einops) go to a folder of their own that only the bench's scans alone
# see (--vendor-path): mamba_ssm's Mamba-2 scan is pure Triton, but transformers must
# not find a mamba_ssm whose Mamba-1 extension is missing (benchmarks/README.md).
set -u
OUT_DIR=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

if [ -d .whl ]; then
    wheels=(.whl/*.whl)
    if ! $PY -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
        wheels+=(.whl/optional/*.whl)
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" || exit 3
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
VENDOR_ARGS=""
if compgen -G ".whl/scan_only/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_scan_only \
        .whl/scan_only/*.whl && VENDOR_ARGS="--vendor-path /tmp/site_scan_only"
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c "import torch, triton, transformers, transformer_lens as tl; from importlib.metadata import version
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'transformer_lens', version('transformer-lens'), 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT_DIR/env.txt"

timeout "${BENCH_LIMIT_S:-330}" $PY benchmarks/bench_triton_gpu.py --out "$OUT_DIR/triton_gpu" $VENDOR_ARGS ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

timeout "${TESTS_LIMIT_S:-160}" $PY -m pytest -q -p no:cacheprovider -W "error:the Triton:RuntimeWarning" \
    tests/test_triton.py tests/test_triton_large.py tests/test_other_device.py::test_workflow_runs_on_cuda 2>&1 \
    | tee "$OUT_DIR/pytest_triton.log"
tests_rc=${PIPESTATUS[0]}

echo "bench rc=$bench_rc (124: cut at its limit), tests/test_triton.py + test_triton_large.py + the workflows on CUDA rc=$tests_rc"
[ -f "$OUT_DIR/triton_gpu.md" ] && cat "$OUT_DIR/triton_gpu.md"
tail -n 15 "$OUT_DIR/pytest_triton.log"
