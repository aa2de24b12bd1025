#!/usr/bin/env bash
# The GPU measurements of issue 13 in one call (docs/benchmarks.md, "GPU"): a CLI smoke run on CUDA,
# bench/gpu_kernels.py (torch's 2:4 and CSR kernels per layer), bench/end_to_end.py (the lock-step
# table with peak device memory; REPEATS single runs per model, one JSON line each, so that a run
# cut short by the time limit keeps the others), bench/gpu_profile.py and the test suite. Run from
# the repository root on a machine with a CUDA device and torch; Fashion-MNIST is found as everywhere
# else (SPFDE_DATA, ~/.cache/spfde, /usr/share). Results go to $OUT (default ./gpu-out). Each part
# has its own time limit; PARTS chooses the parts (default: all).
#
#     SPFDE_DATA=... bash bench/gpu_session.sh
#     PARTS="e2e profile tests" REPEATS=3 DEADLINE=470 bash bench/gpu_session.sh   # fit a lease
#     PARTS=e2e REPEATS=2 E2E_ARGS="--epochs 2 --subset 128 --set freezing.unreachable=reduce" bash bench/gpu_session.sh  # a CPU dry run
set -u
OUT=${OUT:-gpu-out}
PARTS=${PARTS:-"smoke kernels e2e profile tests suite"}
REPEATS=${REPEATS:-1}
DEADLINE=${DEADLINE:-100000}  # seconds from the start: no part runs past it (a lease's time limit)
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
want() { [[ " $PARTS " == *" $1 "* ]]; }
part() {  # part NAME SECONDS CMD...: run CMD with a limit, its output appended to $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS left=$((DEADLINE - SECONDS))
    if ((left < 10)); then echo "== $name: skipped (DEADLINE)"; return; fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  nproc; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
want smoke && part smoke "${SMOKE_S:-60}" bash -c "$PY -m spfde.cli train --config fmnist-demo --set train.epochs=3 \
  --set data.subset=4000 --set freezing.unreachable=reduce --set freezing.cache=auto --out /tmp/gpu-run --force \
  && $PY -m spfde.cli report /tmp/gpu-run && cat /tmp/gpu-run/summary.json"
want kernels && part gpu_kernels "${KERNELS_S:-90}" $PY bench/gpu_kernels.py --json "$OUT/gpu_kernels.json"
if want e2e; then
    rm -f "$OUT"/e2e_*.txt  # --merge below takes every run in these files: this call's alone
    for _ in $(seq "$REPEATS"); do
        for model in resnet20 vit; do
            # shellcheck disable=SC2086  # E2E_ARGS: extra arguments of every run, word-split (the dry run above)
            part "e2e_$model" "${E2E_S:-120}" $PY bench/end_to_end.py --models "$model" --json ${E2E_ARGS:-}
        done
    done
fi
want profile && part profile "${PROFILE_S:-60}" $PY bench/gpu_profile.py
# the CUDA tests (tests/test_cuda.py), then the whole suite as on any machine (it hides the GPU,
# tests/conftest.py) under the device's own torch; -x: the first failure, printed
want tests && part tests "${TESTS_S:-30}" env SPFDE_TEST_CUDA=1 $PY -m pytest -q -rfE --tb=short -p no:cacheprovider \
    -W ignore -m cuda tests
PAR=""  # pytest-xdist and pytest-timeout where installed (the device image has both; the test extras do not)
$PY -c "import xdist, pytest_timeout" 2>/dev/null && PAR="-n 8 --timeout 120"
# shellcheck disable=SC2086
want suite && part suite "${SUITE_S:-150}" $PY -m pytest -q -x -rfE --tb=short -p no:cacheprovider -W ignore \
    $PAR tests
if want e2e && compgen -G "$OUT/e2e_*.txt" >/dev/null; then
    $PY bench/end_to_end.py --merge "$OUT"/e2e_*.txt  # the median tables of the runs that finished
fi
for f in gpu_kernels profile; do [ -f "$OUT/$f.txt" ] && tail -n 60 "$OUT/$f.txt"; done
for f in tests suite; do [ -f "$OUT/$f.txt" ] && tail -n 30 "$OUT/$f.txt"; done
exit 0
