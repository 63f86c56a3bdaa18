#!/usr/bin/env bash
# Create .venv and install raydistill with everything it needs (idempotent, ~2-4 min the first time).
#   ./scripts/bootstrap.sh          # CPU machine: vLLM's CPU build + CPU torch (auto-detected)
#   RAYDISTILL_EXTRA=gpu ./scripts/bootstrap.sh   # GPU machine: CUDA vLLM
# Then `source .venv/bin/activate` (once per shell) puts `raydistill` on PATH, or call
# `.venv/bin/raydistill` as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${RAYDISTILL_EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    RAYDISTILL_EXTRA=gpu; else RAYDISTILL_EXTRA=cpu; fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.raydistill-installed-$(sha256sum pyproject.toml | cut -c1-12)-$RAYDISTILL_EXTRA"
if [ ! -f "$stamp" ]; then
  echo "raydistill: installing into .venv (extra: $RAYDISTILL_EXTRA, dev) ..." >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # HACK: setuptools' editable install of this flat layout (orchestrator/, serve/, … at the
  # root) always ends with an informational "Editable installation … folders in your working
  # directory with the same name as your package may take precedence" warning — true and
  # intended here; only that message (it starts so) is ignored, other build warnings still show
  PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install -q -e ".[$RAYDISTILL_EXTRA,dev]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # vLLM's install pulls PyPI torchvision/torchaudio/torchcodec, which do not match the CPU torch
  # build and break `transformers` model imports (README.md, "Install"); text-only vLLM needs none.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 \
    | grep -v "^WARNING" || true
  .venv/bin/python -c "import vllm, ray, torch, transformers, pyarrow" \
    || { echo "raydistill: install check failed" >&2; exit 1; }
  rm -f .venv/.raydistill-installed-*
  touch "$stamp"
  echo "raydistill: installed; \`source .venv/bin/activate\` puts raydistill on PATH in this" \
       "shell (or call .venv/bin/raydistill)" >&2
fi
