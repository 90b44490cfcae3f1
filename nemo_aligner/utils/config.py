"""Config checks: every key a user sets must be one the recipe knows (typos are errors, not silent defaults)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

#: Sections whose contents are passed through to another library and are therefore not checked.
OPEN_SECTIONS = ("hydra", "exp_manager.wandb_logger_kwargs")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigKeyError(KeyError):
    """An unknown configuration key; the message names it and suggests the closest known key."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def _flatten(cfg: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            if not any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS):
                yield from _flatten(cfg._get_node(key), path)


def check_keys(cfg: DictConfig, schema: DictConfig, source: str = "config") -> None:
    """Raise :class:`ConfigKeyError` for the first key of ``cfg`` that ``schema`` lacks.

    Values are not resolved (interpolations stay untouched). Keys under :data:`OPEN_SECTIONS` are not checked.

    Raises:
        ConfigKeyError: naming the full dotted key and the closest known key, e.g.
            ``unknown config key 'trainer.dpo.max_epoch' (did you mean 'trainer.dpo.max_epochs'?)``.
    """
    known = set(_flatten(schema))
    for key in _flatten(cfg):
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigKeyError(f"unknown config key '{key}' in {source}{hint}")


def load_schema(name: str) -> DictConfig:
    """The reference YAML ``conf/<name>.yaml`` that defines the keys a recipe accepts.

    Raises:
        FileNotFoundError: no such file in ``conf/``.
    """
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no reference config {path}")
    return OmegaConf.load(path)


def as_list(value: Any) -> list:
    """``None`` -> ``[]``, a scalar -> ``[value]``, a list/ListConfig -> list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]
