#!/usr/bin/env bash
# The GPU machine's whole check in one command (../shared/GPU.md): the GPU tests, the suite's fast tier,
# and the GPU benchmark, everything kept under $OUT (default ./gpu-out). Needs the wheels of
# ../shared/GPU.md's recipe in .whl/ when the machine has no package registry. Each part has its own time
# limit, so that one stuck part still leaves the others' results:
#   bash benchmarks/gpu_check.sh            # tests (5 min), fast tier (3 min), benchmark (4 min)
#   GPU_CHECK_PARTS="bench" bash benchmarks/gpu_check.sh
set -uo pipefail
PY=${PY:-python3}  # the GPU machine's python3 has torch; elsewhere PY=.venv/bin/python
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
parts=${GPU_CHECK_PARTS:-"tests fast bench"}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/pip.txt" 2>&1 || {
    echo "wheel install failed: $OUT/pip.txt"; tail -5 "$OUT/pip.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"
  nproc; df -h /dev/shm . | tail -2; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
rc=0
for part in $parts; do
  case $part in
    tests) timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_device.py \
             > "$OUT/test_gpu.txt" 2>&1; r=$? ;;
    fast)  timeout 180 "$PY" -m pytest -q -p no:cacheprovider -n 8 -m "not slow" -x \
             > "$OUT/suite_fast.txt" 2>&1; r=$? ;;
    bench) CKPT_BENCH_DIR=/tmp/ckpt-bench timeout 240 "$PY" -m benchmarks --only gpu --json \
             > "$OUT/bench_gpu.json" 2> "$OUT/bench_gpu.txt"; r=$?
           cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null ;;
    *) echo "unknown part $part"; r=2 ;;
  esac
  echo "== $part: exit $r"
  [ "$r" = 0 ] || rc=$r
done
for f in "$OUT"/test_gpu.txt "$OUT"/suite_fast.txt "$OUT"/bench_gpu.txt; do
  [ -f "$f" ] && { echo "--- $(basename "$f")"; tail -15 "$f"; }
done
exit $rc
