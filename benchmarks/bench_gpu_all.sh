#!/usr/bin/env bash
# Every GPU figure the project still needs, in one command (about 8 minutes on one H100, estimated):
#   1. bench_loss_gpu.py                 the loss alone at both pairs' output layers  -> DIR/loss_gpu.json
#   2. bench_step_gpu.py --pair qwen     one KD step, Qwen2.5 0.5B <- 1.5B            -> DIR/step_gpu_qwen.json
#   3. bench_step_gpu.py --pair llama    one KD step, Llama-3.2-1B <- Llama-3.1-8B    -> DIR/step_gpu_llama.json
# Each runs under its own `timeout`, so that one hang cannot eat the others' time; each script
# rewrites its JSON after every record, so one cut short keeps what it had measured. Each command's
# output also goes to DIR/NAME.log, and the machine (nvidia-smi, versions) to DIR/machine.txt.
# The exit status is 0 only when all three finished (1 at once where CUDA is missing, without --small).
#
#   bash benchmarks/bench_gpu_all.sh [DIR]            # DIR defaults to $OUT, else benchmarks/results
#   bash benchmarks/bench_gpu_all.sh --small [DIR]    # (or SMALL=1) smoke test on a CPU: tiny shapes, 2 steps
#
# Environment: PYTHON (default python3); LOSS_TIMEOUT, QWEN_TIMEOUT, LLAMA_TIMEOUT (seconds). The
# package is imported from src/ (PYTHONPATH), so an installed lmdistill is not needed; torch,
# transformers, pydantic and, for the Liger columns, liger-kernel are. On a lent GPU machine that
# reaches no index: `bash benchmarks/gpu_wheels.sh` here first, then carry .whl along (installed
# from there into /tmp/lmdistill-wheels, ahead of the image's own packages on the path).
set -euo pipefail

usage() { # the comment block at the top of this file
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

small=${SMALL:-0}
dir=""
for arg in "$@"; do
    case "$arg" in
    --small) small=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    -*)
        echo "unknown option: $arg" >&2
        usage >&2
        exit 2
        ;;
    *)
        if [[ -n "$dir" ]]; then
            echo "one output directory only (got $dir and $arg)" >&2
            exit 2
        fi
        dir=$arg
        ;;
    esac
done
dir=${dir:-${OUT:-benchmarks/results}}
mkdir -p "$dir"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
# Wheels carried to a machine that reaches no package index (benchmarks/gpu_wheels.sh puts them in
# .whl), installed into a folder of their own that comes first on the path (so that pydantic's
# newer typing-extensions is the one imported); then a check that lmdistill imports at all, so
# that a missing package fails here in seconds, not in each benchmark.
# (Not with --small: the smoke test runs where the packages are installed, perhaps another Python.)
if [[ "$small" != 1 ]] && compgen -G "$root/.whl/*.whl" >/dev/null; then
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/lmdistill-wheels "$root"/.whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:/tmp/lmdistill-wheels"
    else
        echo "warning: the wheels in .whl did not install (built for another Python?); going on without them" >&2
    fi
fi
if ! "$python" -c "import lmdistill.config, lmdistill.loss.objective, lmdistill.teacher.signals"; then
    echo "lmdistill does not import here (above): carry the wheels of benchmarks/gpu_wheels.sh in .whl" >&2
    exit 1
fi

# What this machine has: the GPU (nvidia-smi), torch and CUDA, transformers, liger-kernel.
probe='
import importlib.metadata as md

import torch
import transformers

try:
    import liger_kernel.transformers  # noqa: F401

    liger = md.version("liger-kernel")
except Exception as exc:
    liger = f"none ({type(exc).__name__})"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
print(f"transformers {transformers.__version__}")
print(f"liger-kernel: {liger}")
'
{
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    else
        echo "nvidia-smi: not found (no NVIDIA GPU here)"
    fi
    "$python" -c "$probe"
} 2>&1 | tee "$dir/machine.txt"
if [[ "$small" != 1 ]] && ! grep -q "cuda available: True" "$dir/machine.txt"; then
    echo "no usable CUDA device here: nothing run (--small runs the smoke test on a CPU)" >&2
    exit 1
fi
# Without Liger's kernels the liger and both speed-ups are skipped: the Llama run then compiles instead.
if grep -q "liger-kernel: none" "$dir/machine.txt"; then llama_speedups=off,compile; else llama_speedups=off,both; fi

if [[ "$small" == 1 ]]; then
    # The same commands at tiny shapes on the CPU; inductor compiles C++ there, hence the long limits.
    common=(--device cpu --small)
    loss_args=(--chunk-sizes 64,128 --warmup 1 --repeats 2)
    qwen_args=(--steps 2 --warmup 1)
    llama_args=(--speedups "$llama_speedups" --steps 2 --warmup 1)
    limits=(900 900 900)
else
    # Times estimated for one H100 from the H200 run of the Qwen step with the models off (build 4 s,
    # warm-up 3-9 s a loss, 190 ms a step, under a minute for the process) and an assumed 45-60 s of
    # torch.compile for each speed-up that compiles the layers; not yet run.
    common=()
    loss_args=() # chunks 512,1024,2048, each compiled afresh; 3 warm-up + 10 timed calls: about 1.5 minutes
    # Qwen: all four speed-ups x three losses, 3 warm-up + 10 timed steps, as the H200 run of the
    # models off had: about 3.5-4 minutes, most of it compiling the layers (compile, both).
    qwen_args=(--steps 10 --warmup 3)
    # Llama: a step has 3.9x the Qwen step's FLOPs (about 0.6 s) and each build moves the 8B teacher
    # (16 GB) onto the device, so all four speed-ups would not fit the 10 minutes. It runs the models
    # off and with both speed-ups (what the trainer's auto settings give on CUDA); compile alone and
    # liger alone are the Qwen run's to show. 2 warm-up steps (the first compiles), 8 timed: about 2.5 minutes.
    llama_args=(--speedups "$llama_speedups" --steps 8 --warmup 2)
    limits=(110 240 200) # 550 s in all, + 15 s grace each at most: a lent machine's command has 10 minutes
fi

failed=()
summary=()
run() { # run NAME LIMIT_S SCRIPT ARGS...: one command under its time limit, its output also in DIR/NAME.log
    local name=$1 limit=$2 script=$3 rc=0 start=$SECONDS
    shift 3
    echo "== $name: $python benchmarks/$script $* (limit ${limit}s)"
    timeout -k 15 "$limit" "$python" "$root/benchmarks/$script" "$@" 2>&1 | tee "$dir/$name.log" || rc=$?
    local took=$((SECONDS - start)) what="ok"
    if [[ $rc == 124 || $rc == 137 ]]; then
        what="timed out after ${limit}s (its JSON, if it got that far, holds the records up to then)"
    elif [[ $rc != 0 ]]; then
        what="failed, exit status $rc (see $dir/$name.log)"
    fi
    [[ $rc == 0 ]] || failed+=("$name")
    summary+=("$(printf '%-16s %4ds  %s' "$name" "$took" "$what")")
    echo "== $name: $what, ${took}s"
}

run loss_gpu "${LOSS_TIMEOUT:-${limits[0]}}" bench_loss_gpu.py "${common[@]}" "${loss_args[@]}" \
    --out "$dir/loss_gpu.json"
run step_gpu_qwen "${QWEN_TIMEOUT:-${limits[1]}}" bench_step_gpu.py --pair qwen "${common[@]}" "${qwen_args[@]}" \
    --out "$dir/step_gpu_qwen.json"
run step_gpu_llama "${LLAMA_TIMEOUT:-${limits[2]}}" bench_step_gpu.py --pair llama "${common[@]}" \
    "${llama_args[@]}" --out "$dir/step_gpu_llama.json"

echo
echo "bench_gpu_all: ${SECONDS}s in all; results in $dir"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "not finished: ${failed[*]}"
    exit 1
fi
