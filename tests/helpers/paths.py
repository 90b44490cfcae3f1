"""Where the repository and the shared data sets are."""

from __future__ import annotations

from pathlib import Path

#: The repository root (the directory holding ``nemo_aligner/``, ``conf/``, ``examples/`` and ``tests/``).
REPO = Path(__file__).resolve().parents[2]
#: The HH-RLHF copy shared by the worktrees (``../shared/data/hh-rlhf`` from the repository root).
SHARED_DATA = REPO.parent / "shared" / "data" / "hh-rlhf"
