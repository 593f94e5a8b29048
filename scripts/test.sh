#!/usr/bin/env bash
# Set up a virtual environment and run MQwen's test suite.
#
#   bash scripts/test.sh                                   # newest transformers 5.x
#   bash scripts/test.sh --transformers "transformers>=4.57,<4.58"
#   VENV=.venv bash scripts/test.sh -- tests/test_modeling.py -x   # reuse a venv, pass pytest args
set -euo pipefail
cd "$(dirname "$0")/.."

transformers_spec="transformers>=5,<6"
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --transformers) transformers_spec="$2"; shift 2 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) pytest_args+=("$1"); shift ;;
  esac
done

venv="${VENV:-.venv-test}"
bash scripts/venv.sh "$venv" dev,convert,train,app "$transformers_spec"
"$venv/bin/python" - <<'PY'
import open_clip, torch, torchvision, transformers
print(f"torch {torch.__version__} | torchvision {torchvision.__version__} | open_clip {open_clip.__version__} "
      f"| transformers {transformers.__version__}")
PY
exec "$venv/bin/python" -m pytest -q "${pytest_args[@]}"
