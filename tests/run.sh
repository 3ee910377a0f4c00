#!/usr/bin/env bash
# The test command: set up the environment, then run the whole suite on CPU.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k config`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest -q "$@"
