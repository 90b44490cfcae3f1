#!/usr/bin/env bash
# Install nemo_aligner and its dependencies into the current Python environment.
#   bash scripts/install.sh            # library + test tools
#   EXTRAS=dev,bench bash scripts/install.sh   # also TRL, for bench/
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  # No torch yet: take the pinned release (a CPU build where the machine provides one) instead of letting the
  # resolver pull the newest CUDA build. Users with a GPU stack can install their own torch first.
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e ".[${EXTRAS}]"
"$PYTHON" -c "import nemo_aligner, torch, transformers, lightning; print(f'nemo_aligner {nemo_aligner.__version__} (torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__})')"
