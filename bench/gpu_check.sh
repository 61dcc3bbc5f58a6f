#!/usr/bin/env bash
# The one GPU check: on a machine with a CUDA device, in at most 8 minutes,
#   1. the CUDA tests (no host synchronisation in the surgery under
#      torch.cuda.set_sync_debug_mode("error"), the same results as on the CPU, TF32 kept
#      out of the Gram), their log in OUT_tests.txt;
#   2. the benchmark at the BERT-base and XLM-R-base presets, t = 1 2 4 8, fp32 and bf16,
#      with the peers, one run per size and dtype (each under its own time limit, so that
#      one slow configuration cannot take the others with it), merged into OUT.json,
#      OUT.md and OUT.png.
# OUT is bench/results/gpu_<device name> unless --out is given.
#
# Usage, from the repository root:
#   bench/gpu_check.sh              # needs a CUDA device; fails at once without one
#   bench/gpu_check.sh --dry-run    # the same steps on the CPU at a tiny size: the CUDA
#                                   # tests are collected and skipped, nothing needs a GPU
#   bench/gpu_check.sh --out DIR/NAME
# Exit status: 0 when every step passed, else the first failing step's status (the other
# steps still run, and their files are still written).
set -uo pipefail

dry_run=0
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --out) out="${2:?--out needs a path}"; shift 2 ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (allowed: --dry-run, --out PATH)" >&2; exit 2 ;;
    esac
done

python="${PYTHON:-python}"
if ! "$python" -c "import torch, gradsurgery" 2>/dev/null; then
    echo "gpu_check.sh: '$python' cannot import torch and gradsurgery; run from the" \
        "repository root after 'pip install -e .[test,bench]'" >&2
    exit 2
fi

if [[ $dry_run -eq 1 ]]; then
    device=cpu
    name=dry-run
    sizes=(2e4)
    bench_limit=60
    timing=(--t 1 2 --methods gem lfmlf --repeat 1 --warmup 0 --threads 1)
else
    if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA device is visible to torch" \
            "(torch.cuda.is_available() is False); use --dry-run on a CPU" >&2
        exit 2
    fi
    device=cuda
    name=$("$python" -c "import torch; print(torch.cuda.get_device_name(0))")
    sizes=(bert-base xlmr-base)
    bench_limit=80 # 4 runs, with the tests and the start-ups: under 8 minutes in all
    timing=(--t 1 2 4 8 --repeat 5 --warmup 2)
fi
slug=$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
out="${out:-bench/results/gpu_${slug}}"
mkdir -p "$(dirname "$out")"
parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT

status=0
note() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
fail() { [[ $status -eq 0 ]] && status=$1; echo "gpu_check.sh: $2 failed (exit $1)" >&2; }

note "machine: $name"
{
    echo "device: $name"
    "$python" -c "import torch, gradsurgery; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gradsurgery', gradsurgery.__version__)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} | tee "${out}_tests.txt"

note "CUDA tests"
# -m cuda selects the tests that need the device; on a GPU none may be skipped.
timeout 100 "$python" -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider -rs 2>&1 |
    tee -a "${out}_tests.txt"
code=${PIPESTATUS[0]}
[[ $code -ne 0 ]] && fail "$code" "CUDA tests"
if [[ $dry_run -eq 0 ]] && grep -q "skipped" "${out}_tests.txt"; then
    fail 1 "CUDA tests (some were skipped on a CUDA machine)"
fi

runs=()
for size in "${sizes[@]}"; do
    for dtype in fp32 bf16; do
        note "benchmark: $size $dtype"
        part="$parts/${size}_${dtype}"
        timeout "$bench_limit" "$python" -m gradsurgery.bench --device "$device" \
            --params "$size" --dtype "$dtype" "${timing[@]}" --quiet --out "$part"
        code=$?
        if [[ $code -eq 0 ]]; then
            runs+=("$part.json")
        else
            fail "$code" "benchmark $size $dtype"
        fi
    done
done

note "report: $out.json, $out.md, $out.png"
if [[ ${#runs[@]} -gt 0 ]]; then
    "$python" -m gradsurgery.bench --render "${runs[@]}" --out "$out" >/dev/null || fail $? "report"
else
    fail 1 "report (no benchmark run finished)"
fi
exit $status
