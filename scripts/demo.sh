#!/usr/bin/env bash
# The main job: set up a virtual environment, then build, train, save, reload and evaluate the shapes captioner.
#
#   bash scripts/demo.sh                 # full run (trains on CPU; see the README for measured figures)
#   bash scripts/demo.sh --help          # the demo's own options
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
bash scripts/venv.sh "$venv" convert,train "transformers>=5,<6"
exec "$venv/bin/python" -m mqwen.demo "$@"
