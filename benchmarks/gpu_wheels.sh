#!/usr/bin/env bash
# The Python packages bench_gpu_all.sh needs that a lent GPU machine lacks, as wheels for its Python
# (CPython 3.12, x86-64 Linux), downloaded here into DIR (default .whl, which git ignores) to travel
# with the working tree: that machine reaches no package index. Its image has torch, transformers,
# accelerate, tokenizers, safetensors, peft and triton; lmdistill's config needs pydantic, and the
# Liger columns need liger-kernel. bench_gpu_all.sh installs whatever it finds in .whl first.
#
#   bash benchmarks/gpu_wheels.sh [DIR]
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
# The versions this project's environment resolved (pydantic-core must match pydantic exactly).
# typing-extensions: pydantic 2.14 needs one newer than an image may hold.
wheels=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 liger-kernel==0.8.5)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "${wheels[@]}"
ls -l "$dir"
