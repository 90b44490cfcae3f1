"""The entry scripts (``examples/nlp/gpt/*.py``) as importable modules."""

from __future__ import annotations

import importlib.util
import sys

from tests.helpers.paths import REPO


def load_example_script(name: str):
    """Import ``examples/nlp/gpt/<name>.py`` as a module (for in-process end-to-end tests)."""
    path = REPO / "examples" / "nlp" / "gpt" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
