#!/usr/bin/env bash
# Set up .venv with this package and its test/export extras. Idempotent; safe to re-run.
# On the CPU machines torch comes from the local 2.13.0 CPU build; elsewhere pip fetches the matching wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# -qq: pip's errors only (its warnings and the build backend's deprecation notices are not the user's to act on).
python -m pip install -qq --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -qq "torch==2.13.0"
python -m pip install -qq -e '.[dev,export]'
# Versions from the package metadata: importing the libraries would print their own start-up warnings.
python -c 'import importlib.metadata as m; print("setup:", *(f"{p} {m.version(p)}" for p in ("torch", "deepspeed", "megatron-core")))'
