#!/usr/bin/env bash
# Fill .whl/ with what a lent GPU machine lacks, before the session (it has no network):
#   - TransformerLens 4.3 and what it imports that the machine's image has not (datasets,
#     dill, multiprocess), as wheels for its Python (3.12, manylinux x86_64);
#   - pyarrow into .whl/optional/ (run_gpu_session.sh installs it only where the machine's
#     is older than datasets needs);
#   - with a mamba_ssm source checkout given, mamba_ssm built without its CUDA extension,
#     and einops, into .whl/scan_only/: its Mamba-2 scan is pure Triton, which the bench
#     times beside ours (--vendor-path; benchmarks/README.md says why it is kept apart).
#
#   bash benchmarks/prepare_gpu_wheels.sh [MAMBA_SOURCE_DIR]    # from the repository root
#
# .whl/ is added to .git/info/exclude, so that it is never committed; the device tool
# carries it with carry=[".whl"]. GPU_PYTHON sets the target Python (default 3.12).
set -eu
PY=${PYTHON:-python3}
TARGET=(--no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
mkdir -p .whl/optional
$PY -m pip download -q "${TARGET[@]}" -d .whl transformer_lens==4.3.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19
$PY -m pip download -q "${TARGET[@]}" -d .whl/optional "pyarrow>=24"
if [ -n "${1:-}" ]; then
    [ -f "$1/setup.py" ] || { echo "$1 is not a mamba_ssm source checkout (no setup.py)" >&2; exit 2; }
    mkdir -p .whl/scan_only
    # --no-build-isolation: its setup.py imports torch, which this environment has (a CPU build)
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $PY -m pip wheel -q --no-deps --no-build-isolation \
        "$1" -w .whl/scan_only
    $PY -m pip download -q --no-deps --only-binary=:all: -d .whl/scan_only einops
fi
exclude="$(git rev-parse --git-dir)/info/exclude"
grep -qxF ".whl/" "$exclude" 2>/dev/null || echo ".whl/" >> "$exclude"
find .whl -type f -name "*.whl" | sort
du -sh .whl
