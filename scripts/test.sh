#!/usr/bin/env bash
# Install, check the layer contract (.importlinter: no module imports a higher floor), then run the whole test suite
# (tiny random models; a few slow tests use the real SmolLM2-135M). pytest.ini's testpaths = tests collects every
# folder of tests/ (unit/<floor>/, recipes/, architecture/). The tests marked long are left out unless you pass --long
# (bash scripts/test.sh --long runs everything).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev,vllm,ray} bash scripts/install.sh   # vLLM and Ray too: their tests run here, not skipped
lint-imports --no-cache
python3 -m pytest -q -p no:cacheprovider --durations=25 "$@"   # the 25 slowest tests are listed at the end
