#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its dev, ft (torchft), docs (mkdocs) and
# lm (Hugging Face datasets) extras.
# torch goes in first, pinned: a bare torch requirement on a machine without torch
# pulls a multi-GB CUDA build; with 2.13.0 present the project's torch>=2.4 adds nothing.
# It says what it is doing, and while pip works, that it still does (every
# LOCALSGD_SETUP_HEARTBEAT seconds, 20 by default): a fresh setup takes 2-3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
HEARTBEAT=${LOCALSGD_SETUP_HEARTBEAT:-20}

# run "$@", printing "setup: still <what> (N s)" every HEARTBEAT seconds until it ends
step() {
    local what=$1 start=$SECONDS next=$HEARTBEAT pid status=0
    shift
    echo "setup: $what"
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if [ $((SECONDS - start)) -ge "$next" ] && kill -0 "$pid" 2>/dev/null; then
            echo "setup: still $what ($((SECONDS - start)) s)"
            next=$((next + HEARTBEAT))
        fi
    done
    wait "$pid" || status=$?
    [ "$status" -eq 0 ] || { echo "setup: $what failed (exit $status)" >&2; exit "$status"; }
}

[ -x .venv/bin/python ] || step "creating .venv with $PYTHON" "$PYTHON" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null ||
    step "installing torch==${TORCH_VERSION:-2.13.0} (the CPU build where there is no GPU)" \
        .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
step "installing localsgd and its dependencies (pip install -e .[dev,ft,docs,lm])" .venv/bin/pip install -q -e ".[dev,ft,docs,lm]"
# the language models' embedded corpus, the King James Bible (public domain): Debian's bible-kjv
if ! command -v bible >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    step "installing bible-kjv (the language models' embedded corpus)" sh -c \
        'export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q --no-install-recommends bible-kjv >/dev/null 2>&1 ||
         { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends bible-kjv >/dev/null; }'
fi
command -v bible >/dev/null || echo "setup: bible-kjv is not installed (needs root and apt): the language models need path= to a text"
.venv/bin/python -c "import localsgd, torch, lightning; print('localsgd ready: torch', torch.__version__, '| lightning', lightning.__version__)"
