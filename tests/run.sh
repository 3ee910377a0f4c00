#!/usr/bin/env bash
# The test command: set up the environment, then run the whole suite on CPU.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k config`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# Two workers (pytest-xdist) on a CPU machine, each file on one of them, where its module fixtures (runs trained
# once, a Slurm cluster) are made once: one worker computes while the other waits on a timeout, a Slurm job or a
# process start. One on a GPU machine: the GPU suite sizes its lanes from the GPU memory that is free.
workers=${PRETRAIN_TEST_WORKERS:-$(nvidia-smi -L >/dev/null 2>&1 && echo 0 || echo 2)}
python -m pytest -q -n "$workers" --dist loadfile "$@"
