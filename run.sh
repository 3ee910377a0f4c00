#!/usr/bin/env bash
# The main job: set up .venv (launch/setup.sh), then `pretrain demo`: the whole life of a small Mistral-shaped model
# on the built-in corpus, on CPU. Arguments go to `pretrain demo` (e.g. `bash run.sh train.steps=400`).
# Re-running starts clean: the data is made again and runs/demo is replaced.
set -euo pipefail
cd "$(dirname "$0")"
start=$SECONDS
echo "run.sh: setting up .venv (launch/setup.sh; the first time pip installs torch, DeepSpeed, megatron-core...)"
bash launch/setup.sh
echo "run.sh: setup took $((SECONDS - start)) s"
# shellcheck disable=SC1091
. .venv/bin/activate
pretrain demo "$@"
echo "run.sh: total $((SECONDS - start)) s, setup included"
