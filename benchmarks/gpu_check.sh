#!/usr/bin/env bash
# pyco's GPU check, run from anywhere in the repository on a machine with an NVIDIA GPU, no network needed
# (torch with CUDA, nvcc, pybind11, cmake, pytest installed; ninja and compute-sanitizer used when found):
#
#   env        versions of the driver, torch, nvcc, cmake (never fails)
#   build      a plain CMake build (PYCO_CUDA=ON) into $PYCO_CHECK_BUILD; the package is assembled with the
#              modules just built under $PYCO_CHECK_BUILD/site, which goes first on PYTHONPATH (it also wins
#              over an editable install of pyco)
#   import     that copy of pyco imports, with its CUDA module
#   ctest      test_cuda_rules: the CUDA arithmetic, plans, init flags and staging pool on the host
#   --- the stages below need a GPU; without one the script stops here, exit status 0 ---
#   smoke      benchmarks/cuda_smoke.py: every dtype x rule on CUDA against the CPU path, awkward views
#   pytest     tests/test_cuda.py tests/test_cuda_host.py, and pyco.Coupled's GPU-against-CPU test
#   memcheck, racecheck, synccheck   compute-sanitizer on the smoke test (--quick, fewer cases)
#   bench_1e9, bench_small           benchmarks/bench_update.py --device cuda, 1e9 elements / 2000 tensors
#
# Each stage runs under its own timeout (and all of them within PYCO_CHECK_BUDGET seconds, default 465:
# under 8 minutes), logs to $OUT/<stage>.log and writes $OUT/<stage>.json (stage, status, rc, seconds,
# device); $OUT/summary.json lists them all. OUT defaults to ./gpu-check-out. Exit status: 0 when every
# stage that ran passed (also when there is no GPU), 1 otherwise.
#
#   bash benchmarks/gpu_check.sh
#   OUT=/tmp/check PYCO_CHECK_BUILD=/tmp/check-build bash benchmarks/gpu_check.sh
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
BUILD=${PYCO_CHECK_BUILD:-$ROOT/build/gpu-check}
SITE=$BUILD/site
BUDGET=${PYCO_CHECK_BUDGET:-465}
JOBS=${PYCO_CHECK_JOBS:-$(nproc 2>/dev/null || echo 4)}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
START=$(date +%s)
DEVICE="none"
STAGES=()   # the stages' JSON objects, for summary.json
FAILED=0
STOPPED_BEFORE=""
export ROOT BUILD SITE JOBS PYTHON

json_str() {  # a JSON string literal
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\t'/\\t}; s=${s//$'\r'/}
  printf '"%s"' "$s"
}

record() {  # stage status rc seconds: writes $OUT/<stage>.json and remembers it for the summary
  local obj
  obj=$(printf '{"stage": %s, "status": %s, "rc": %s, "seconds": %s, "device": %s, "log": %s}' \
    "$(json_str "$1")" "$(json_str "$2")" "$3" "$4" "$(json_str "$DEVICE")" "$(json_str "$1.log")")
  printf '%s\n' "$obj" > "$OUT/$1.json"
  STAGES+=("$obj")
}

# stage NAME LIMIT COMMAND...: runs COMMAND under `timeout` (LIMIT seconds, less if the budget is short).
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 15 )); then
    echo "== $name: not run (the ${BUDGET} s budget is spent)"
    echo "not run: budget spent" > "$OUT/$name.log"
    record "$name" "not run (budget spent)" -1 0
    FAILED=$((FAILED + 1))
    return 1
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit} s): $*"
  local t0 rc secs status
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=passed ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status=failed ;;
  esac
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  echo "   $name: $status (rc $rc, ${secs} s)"
  record "$name" "$status" "$rc" "$secs"
  [[ $rc == 0 ]] || FAILED=$((FAILED + 1))
  return $rc
}

finish() {
  local total=$(( $(date +%s) - START )) joined
  joined=$(IFS=,; echo "${STAGES[*]}")
  printf '{"device": %s, "stopped_before": %s, "seconds": %s, "failed": %s, "stages": [%s]}\n' \
    "$(json_str "$DEVICE")" "$( [[ -n $STOPPED_BEFORE ]] && json_str "$STOPPED_BEFORE" || echo null)" \
    "$total" "$FAILED" "$joined" > "$OUT/summary.json"
  echo "gpu_check: $FAILED stage(s) failed, ${total} s; logs and JSON in $OUT"
  exit $(( FAILED > 0 ))
}

env_report() {
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  echo "cpus: $(nproc)"
  if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  cat /proc/driver/nvidia/version 2>/dev/null || echo "/proc/driver/nvidia/version: absent"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  "${CUDACXX:-nvcc}" --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version 2>/dev/null || echo "nvcc: not found"
  cmake --version | head -1
  command -v ninja > /dev/null && echo "ninja $(ninja --version)" || echo "ninja: not found"
  return 0
}
export -f env_report

build_pyco() {
  set -e
  local generator=()
  command -v ninja > /dev/null && generator=(-G Ninja)
  if [[ -f $BUILD/CMakeCache.txt ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${generator[1]:-Unix Makefiles}$" \
      "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD"  # another generator built here before
  fi
  cmake -S "$ROOT" -B "$BUILD" "${generator[@]}" -DPYCO_CUDA=ON -DPYCO_INPLACE_MODULE=OFF \
    -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PYTHON"
  cmake --build "$BUILD" -j "$JOBS"
  # the package, with the modules just built, where PYTHONPATH finds it first
  rm -rf "$SITE"
  mkdir -p "$SITE"
  cp -r "$ROOT/pyco" "$SITE/pyco"
  find "$SITE/pyco" -name __pycache__ -prune -exec rm -rf {} +
  rm -f "$SITE"/pyco/_C*.so
  cp "$BUILD"/_C*.so "$SITE/pyco/"
  cat > "$SITE/sitecustomize.py" <<'EOF'
# Written by benchmarks/gpu_check.sh: the copy of pyco in this directory, with the modules just built, wins
# over an editable install of pyco (whose import hook would otherwise answer `import pyco` first).
import sys

sys.meta_path[:] = [f for f in sys.meta_path if not any(
    name == "pyco" or name.startswith("pyco.") for name in getattr(f, "known_source_files", {}))]
EOF
  ls -l "$SITE/pyco/"_C*.so
}
export -f build_pyco

check_import() {
  "$PYTHON" - <<'EOF'
import os, sys
import pyco
from pyco._ext import _C_cuda, _CUDA_MISSING
site = os.environ["SITE"]
assert pyco.__file__.startswith(site), f"imported {pyco.__file__}, not the copy under {site}"
assert _C_cuda is not None, f"pyco._C_cuda did not import: {_CUDA_MISSING}"
assert _C_cuda.__file__.startswith(site), _C_cuda.__file__
info = pyco.info()
print({k: info[k] for k in ("pyco", "torch", "cpu_isa", "cuda_kernels", "cuda_architectures",
                            "cuda_version_at_build", "cuda_devices")})
print("driver facts:", _C_cuda.driver_facts())
EOF
}
export -f check_import

echo "gpu_check: repository $ROOT, build $BUILD, output $OUT, budget ${BUDGET} s, ${JOBS} jobs"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

stage env 60 bash -c env_report
stage build 330 bash -c build_pyco || finish
# Python runs from the build directory: `python -m ...` and `python -` put the working directory first on
# sys.path, and the repository's pyco/ there has no compiled modules
cd "$BUILD" || finish
stage import 60 bash -c check_import || finish
stage ctest 120 ctest --test-dir "$BUILD" -R cuda_rules --output-on-failure

# ---- from here on a GPU is needed ----
gpu_reason=""
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
  gpu_reason="torch.cuda.is_available() is False"
  command -v nvidia-smi > /dev/null || gpu_reason="$gpu_reason, nvidia-smi not found"
fi
if [[ -n $gpu_reason ]]; then
  STOPPED_BEFORE=smoke
  echo "no GPU: stopping before stage smoke ($gpu_reason); the stages above ran"
  finish
fi
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)
[[ -n $DEVICE ]] || DEVICE=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2> /dev/null)
[[ -n $DEVICE ]] || DEVICE=unknown
echo "gpu_check: device $DEVICE"

stage smoke 150 "$PYTHON" "$ROOT/benchmarks/cuda_smoke.py" --out "$OUT/smoke.json"
stage pytest 300 "$PYTHON" -m pytest -q -p no:cacheprovider -rs -c "$ROOT/pyproject.toml" --rootdir "$ROOT" \
  "$ROOT/tests/test_cuda.py" "$ROOT/tests/test_cuda_host.py" \
  "$ROOT/tests/test_coupled.py::test_the_step_on_a_gpu_equals_the_cpu_step" --junitxml="$OUT/pytest.xml"

SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z $SANITIZER && -x $candidate ]] && SANITIZER=$candidate
done
if [[ -z $SANITIZER ]]; then
  SANITIZER=$(find "$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])')" -path '*nvidia*' \
    -name compute-sanitizer -type f -perm -u+x 2> /dev/null | head -1)
fi
smoke_quick=("$PYTHON" "$ROOT/benchmarks/cuda_smoke.py" --quick)
if [[ -n $SANITIZER ]]; then
  # without torch's caching allocator every tensor is its own cudaMalloc: memcheck sees exact bounds
  stage memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "${smoke_quick[@]}" \
    --rules sgd-momentum sgd-nesterov adam amsgrad
  stage racecheck 120 "$SANITIZER" --tool racecheck --error-exitcode 1 "${smoke_quick[@]}" \
    --dtypes float32 float16 --rules sgd-momentum adam
  stage synccheck 100 "$SANITIZER" --tool synccheck --error-exitcode 1 "${smoke_quick[@]}" \
    --dtypes float32 bfloat16 --rules sgd-momentum adam
else
  for tool in memcheck racecheck synccheck; do
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda, pip's nvidia packages)" \
      > "$OUT/$tool.log"
    echo "== $tool: compute-sanitizer not found"
    record "$tool" "not run (compute-sanitizer not found)" 127 0
    FAILED=$((FAILED + 1))
  done
fi

stage bench_1e9 240 "$PYTHON" "$ROOT/benchmarks/bench_update.py" --device cuda --size 1e9 --repeats 10 \
  --out "$OUT/bench-cuda-1e9.json"
stage bench_small 120 "$PYTHON" "$ROOT/benchmarks/bench_update.py" --device cuda --shapes small --repeats 10 \
  --out "$OUT/bench-cuda-small.json"
finish
