#!/usr/bin/env bash
# Create the virtual environment VENV (once) and install this checkout into it, editable, with EXTRAS and the
# transformers release TRANSFORMERS_SPEC; torch, torchvision and open_clip as the matched set of constraints.txt.
#
#   bash scripts/venv.sh VENV EXTRAS TRANSFORMERS_SPEC      e.g. bash scripts/venv.sh .venv convert,train "transformers>=5,<6"
#
# Used by scripts/test.sh and scripts/demo.sh; PYTHON picks the interpreter that creates the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$1" extras="$2" transformers_spec="$3"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel
"${pip[@]}" install -c constraints.txt -e ".[$extras]" "$transformers_spec"
