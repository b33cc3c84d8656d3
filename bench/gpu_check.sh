#!/usr/bin/env bash
# One-shot GPU check (issue 17): every GPU check of the project in one go, for scarce GPU time.
#
#   bash bench/gpu_check.sh [OUTPUT_DIR]            # on one H100/H200, about 6-7 minutes
#   bash bench/gpu_check.sh --dry-run [OUTPUT_DIR]  # on the CPU: the plumbing at tiny sizes
#                                                   # (also GPU_CHECK_DRY_RUN=1)
#
# Needs only a stock GPU image (python3 with PyTorch, Triton, pytest): grokserve is imported from
# this checkout through a symlinked package in a temporary directory (no install, no pydantic, no
# Ray). Results land in OUTPUT_DIR, else $OUT, else ./gpu_check_out: log (everything printed),
# pytest.txt, precompile.txt, moe_full.json, moe_deployed.json, decode.txt, moe_tiles.json (the
# sweep's table: load it with GROKSERVE_MOE_TILES=moe_tiles.json or copy it to
# model/kernels/moe_tiles.json).
# Every step has its own time box, so a hang in one step loses none of the others.
set -u -o pipefail

dry_run=${GPU_CHECK_DRY_RUN:-}
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
out_dir=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 1
python=${PYTHON:-python3}

shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
bash "$repo/scripts/package_tree.sh" "$shim"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1  # operator/ must not shadow the stdlib's operator

if [[ -n "$dry_run" ]]; then
  export TRITON_INTERPRET=1
  # name, seconds, command: tiny sizes on the CPU
  steps=(
    "pytest|120|$python -m pytest -q -p no:cacheprovider -m gpu tests/model/test_kernels_moe.py"
    "moe_full|110|GROKSERVE_MOE_LOOP_FROM=8 $python bench/moe.py --dry-run --shapes 4x128 --tokens 1 8 --json $out_dir/moe_full.json"
    "moe_deployed|120|$python bench/moe.py --dry-run --shapes 1x128 --tokens 8 --json $out_dir/moe_deployed.json"
    "decode|120|$python bench/decode.py --dry-run --batch 1 2 --context 20 --layers 1"
    "sweep|120|$python bench/moe.py --dry-run --sweep --shapes 1x128 --tokens 1 --sweep-budget-s 1 --compile-workers 1 --sweep-json $out_dir/moe_tiles.json"
  )
  beside_first="precompile|60|$python bench/moe.py --dry-run --precompile --shapes 1x128 --tokens 1 --compile-workers 1"
else
  all_tokens="1 8 64 256 1024 4096 16384"
  sweep_shapes="8x4096 8x32768 1x32768"  # the default deployment's slice first
  steps=(
    "pytest|90|$python -m pytest -q -p no:cacheprovider -m gpu tests/model/test_kernels_moe.py tests/model/test_kernels_attention.py tests/model/test_model_paged.py"
    "moe_full|110|$python bench/moe.py --shapes 8x32768 --tokens $all_tokens --json $out_dir/moe_full.json"
    "moe_deployed|75|$python bench/moe.py --shapes 8x4096 1x32768 --tokens $all_tokens --json $out_dir/moe_deployed.json"
    "decode|95|$python bench/decode.py --batch 1 8 64 --context 1024 --layers 4"
    "sweep|90|$python bench/moe.py --sweep --shapes $sweep_shapes --tokens $all_tokens --sweep-budget-s 60 --sweep-json $out_dir/moe_tiles.json"
  )
  # The sweep's kernels compile on the idle cores while the CUDA tests run (timing nothing).
  beside_first="precompile|150|$python bench/moe.py --precompile --shapes $sweep_shapes --tokens $all_tokens"
fi

run_step() {  # name seconds command: prints a header, the output, and the status with the time
  local name=$1 seconds=$2 command=$3 started status
  started=$(date +%s)
  echo "=== $name (time box ${seconds}s): $command"
  # The pytest and decode steps' output also goes to a file of their own.
  local copy=/dev/null
  [[ $name == pytest ]] && copy=$out_dir/pytest.txt
  [[ $name == decode ]] && copy=$out_dir/decode.txt
  timeout --kill-after=10 "$seconds" bash -c "$command" 2>&1 | tee "$copy"
  status=$?
  echo "=== $name: exit $status after $(($(date +%s) - started))s$( ((status == 124)) && echo ' (TIMED OUT)')"
  return "$status"
}

main() {
  local failed=()
  echo "=== gpu_check $(date -u +%FT%TZ) in $repo, output in $out_dir${dry_run:+ (DRY RUN: CPU, tiny sizes)}"
  git -C "$repo" log -1 --oneline 2>/dev/null || true
  timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || true
  timeout 30 "$python" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' || true
  local beside_pid="" first=1 name seconds command status
  IFS='|' read -r name seconds command <<<"$beside_first"
  echo "=== $name in the background beside the first step (output in $name.txt): $command"
  timeout --kill-after=10 "$seconds" bash -c "$command" >"$out_dir/$name.txt" 2>&1 &
  beside_pid=$!
  for step in "${steps[@]}"; do
    IFS='|' read -r name seconds command <<<"$step"
    run_step "$name" "$seconds" "$command" || failed+=("$name")
    if ((first)); then
      first=0
      kill -TERM "$beside_pid" 2>/dev/null  # timeout passes it on to its whole process group
      wait "$beside_pid"
      status=$?
      echo "=== background step: exit $status (143: stopped when the first step ended)"
      tail -n 3 "$out_dir/${beside_first%%|*}.txt"
    fi
  done
  echo "=== gpu_check done: ${#failed[@]} step(s) failed${failed[*]:+: ${failed[*]}}"
  ((${#failed[@]} == 0))
}

main 2>&1 | tee "$out_dir/log"
