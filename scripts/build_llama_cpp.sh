#!/usr/bin/env bash
# Build llama.cpp's multimodal runtime and its Python bindings from llama-cpp-python's source distribution on
# PyPI, once per machine, into an environment of their own; print that environment's python.
#
# Only the libraries the bindings load are compiled (ggml, llama, mtmd: about 140 files, CPU only, no common/
# tools/server), then the sdist's pure-Python `llama_cpp` package is installed beside them. A rebuild happens
# only when the cache folder is missing.
#
# The vendored llama.cpp gets one change first, the one-line fix of ggml-org/llama.cpp PR #25844 (issue #25814):
# its LLaVA vision graph appends the class token after the patch tokens while its inputs (position ids 0..n,
# patch rows 1..n) still assume the class token comes first, so with any CLIP mmproj every patch gets its
# neighbour's position embedding, patch 0 is dropped and the class token reaches the language model. The fix
# restores the class-token-first order. The build stops if that line is not found (a newer llama.cpp may have
# merged the fix: then drop the patch here).
#
# usage: bash scripts/build_llama_cpp.sh [PYTHON]     (PYTHON creates the venv; default python3)
set -euo pipefail
VERSION=0.3.36
PY=${1:-python3}
CACHE=${MQWEN_CI_CACHE:-$HOME/.cache/mqwen-ci}
VENV=$CACHE/llama-cpp-python-$VERSION-cls-first
if "$VENV/bin/python" -c "import llama_cpp.mtmd_cpp" >/dev/null 2>&1; then
  echo "$VENV/bin/python"
  exit 0
fi
work=$CACHE/.llama-cpp-build-$VERSION
rm -rf "$work" "$VENV" "$VENV.partial"
mkdir -p "$work"
"$PY" -m venv "$VENV.partial"
"$VENV.partial/bin/pip" download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$work" >&2
tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
src=$work/llama_cpp_python-$VERSION
"$VENV.partial/bin/python" - "$src/vendor/llama.cpp/tools/mtmd/models/llava.cpp" <<'PYEOF'
import sys
path = sys.argv[1]
text = open(path).read()
old = "inp = ggml_concat(ctx0, inp, model.class_embedding, 1);"
if text.count(old) != 1:
    sys.exit(f"{path}: the line fixed by llama.cpp PR #25844 was not found; update scripts/build_llama_cpp.sh")
open(path, "w").write(text.replace(old, "inp = ggml_concat(ctx0, model.class_embedding, inp, 1);"))
PYEOF
echo "building llama.cpp (ggml, llama, mtmd) from llama-cpp-python $VERSION: 10-60 min on 2 cores ..." >&2
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=OFF \
  -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=OFF >&2
nice -n 10 cmake --build "$work/build" --target mtmd llama -j "${MQWEN_BUILD_JOBS:-2}" >&2
"$VENV.partial/bin/pip" install -q "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3" >&2
site=$("$VENV.partial/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$src/llama_cpp" "$site/llama_cpp"
mkdir -p "$site/llama_cpp/lib"
find "$work/build" -name "lib*.so*" -exec cp -P {} "$site/llama_cpp/lib/" \;
mv "$VENV.partial" "$VENV"
"$VENV/bin/python" -c "import llama_cpp.mtmd_cpp" >&2
rm -rf "$work"
echo "$VENV/bin/python"
