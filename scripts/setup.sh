#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its dev, ft (torchft) and docs (mkdocs) extras.
# torch goes in first, pinned: a bare torch requirement on a machine without torch
# pulls a multi-GB CUDA build; with 2.13.0 present the project's torch>=2.4 adds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[dev,ft,docs]"
.venv/bin/python -c "import localsgd, torch, lightning; print('localsgd ready: torch', torch.__version__, '| lightning', lightning.__version__)"
