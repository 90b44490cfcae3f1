"""The reference configs (``conf/*.yaml``), composed the way the entry scripts compose them."""

from __future__ import annotations

from collections.abc import Iterable

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from nemo_aligner.utils.config import CONF_DIR


def compose_config(name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """``conf/<name>.yaml`` (from :data:`nemo_aligner.utils.config.CONF_DIR`) composed by Hydra with ``overrides``,
    Hydra command-line strings such as ``"model.optim.lr=1e-3"``, ``"+new.key=1"`` or ``"++maybe.key=1"``: the config
    an entry script's ``@hydra.main(config_path=str(CONF_DIR), config_name=name, version_base="1.3")`` hands to
    ``run`` for that command line (struct mode on, no ``hydra`` section). Hydra raises its own errors for an override
    of a key the YAML lacks (without ``+``) or a name with no YAML. The tests' one way to build a config: test
    bodies, module-level builders (``dpo_cfg``, ``ppo_cfg``, ...) and module-scoped fixtures all call it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))
