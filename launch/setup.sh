#!/usr/bin/env bash
# Set up .venv with this package and its test/export extras. Idempotent; safe to re-run.
# On the CPU machines torch comes from the local 2.13.0 CPU build; elsewhere pip fetches the matching wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e '.[dev,export]'
echo "setup: $(python -c 'import torch, deepspeed, megatron.core as m; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "megatron-core", m.__version__)')" 2>/dev/null
