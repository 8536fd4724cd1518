#!/usr/bin/env bash
# The main job in one command, on a fresh machine too: make (or reuse) a virtual environment, install what
# the command line needs, then fine-tune and say where the result is.
#   bash finetune.sh                      # the demo: a random-init SD VAE and synthetic fundus-like images
#   bash finetune.sh --vae BASE.safetensors --data DIR --out OUT.safetensors [more fit flags]
# VENV (default .venv) picks the environment; PYTHON (default python3) the interpreter that makes it.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "making a virtual environment in $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch, torchvision" 2>/dev/null; then
  echo "installing torch and torchvision (the registry's build; a CUDA build also runs on the CPU)"
  python -m pip install -q torch torchvision
fi
python -m pip install -q -r requirements-standalone.txt

if [ $# -gt 0 ]; then
  result=$(python -m training fit "$@")
else
  # LPIPS off: a fresh machine has no VGG weights (see the README), and nothing is downloaded.
  python -m training demo --out demo >/dev/null
  result=$(python -m training fit --vae demo/sd-vae-random-init-4ch.safetensors --data demo/images \
    --out demo/vae-ft-demo-10.safetensors --overwrite --steps 10 --patch-size 64 --batch-size 2 --lpips-weight 0)
fi
echo "$result"
python - "$result" <<'PY'
import json, os, sys
out = json.loads(sys.argv[1].strip().splitlines()[-1])["out"]
print(f"fine-tuned VAE: {os.path.abspath(out)}  (copy it to ComfyUI/models/vae/ to use it with Load VAE)")
PY
