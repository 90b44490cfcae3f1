#!/usr/bin/env bash
# Install, then run the whole test suite (tiny random models; a few slow tests use the real SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pytest -q -p no:cacheprovider "$@"
