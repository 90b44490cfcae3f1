"""Serve the PPO critic over HTTP for a served-mode PPO run (default http://127.0.0.1:5557).

    python examples/nlp/gpt/serve_ppo_critic.py \
        pretrained_checkpoint.restore_from_path=results/rm_quickstart/hf_export trainer.ppo.port=5557

The critic is initialised from the reward-model export (or any causal-LM checkpoint), infers values
(``POST /infer``), trains with the clipped value loss (``POST /train``) and checkpoints (``POST /save``/``/load``)
when the actor (train_gpt_ppo_actor.py with ``remote_critic_rm.enable=true``) asks. It resumes from the checkpoint
the actor asks for, and goes back to its start-up state (``POST /reset``) when a fresh actor run begins, so one
server can serve several runs in turn. Configuration: conf/gpt_ppo_critic.yaml. See docs/user-guide/ppo.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nemo_aligner.recipes.common import run_or_exit
from nemo_aligner.servers.app import check_api_token, check_host, check_port, run_server
from nemo_aligner.utils.config import CONF_DIR, ConfigValueError, check_keys, load_schema, number
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import build_fabric, normalize_precision


def build(cfg: DictConfig):
    """Check ``cfg``, load the critic and build the app: ``(app, serve_kwargs)`` for
    :func:`nemo_aligner.servers.app.run_server`.

    Raises:
        ConfigKeyError: an unknown key; ValueError: a non-loopback host without ``allow_remote``, more than one
            device, a port outside 0..65535, a blank api_token, a batch size < 1 or a negative queue delay (all
            before the critic loads).
    """
    check_keys(cfg, load_schema("gpt_ppo_critic"), source="gpt_ppo_critic config")
    ppo = cfg.trainer.ppo
    host, allow_remote = str(ppo.host), bool(ppo.allow_remote)
    check_host(host, allow_remote)
    port = check_port(ppo.port, "trainer.ppo.port")
    check_api_token(ppo.api_token, "trainer.ppo.api_token")
    sizes = {key: number(int, 1)(cfg.model[key], f"model.{key}")
             for key in ("forward_micro_batch_size", "micro_batch_size", "global_batch_size")}
    delay_us = number(float, 0)(ppo.max_queue_delay_microseconds, "trainer.ppo.max_queue_delay_microseconds")
    if int(cfg.trainer.devices) != 1 or int(cfg.trainer.num_nodes) != 1:
        raise ConfigValueError("the critic server runs one replica per process: set trainer.devices=1 trainer.num_nodes=1")
    from nemo_aligner.models.critic import HFCritic
    from nemo_aligner.servers.critic_server import build_critic_app

    fabric = build_fabric(cfg.trainer, seed=int(cfg.model.seed))
    critic = HFCritic(
        fabric, cfg.model, str(cfg.pretrained_checkpoint.restore_from_path),
        max_steps=int(ppo.max_steps), gradient_clip_val=float(ppo.gradient_clip_val),
        loss_clip_val=float(cfg.model.loss_clip_val), precision=normalize_precision(cfg.trainer.precision),
    )
    log_dir = Path(cfg.exp_manager.explicit_log_dir)
    app = build_critic_app(
        critic, log_dir / "checkpoints",
        forward_micro_batch_size=sizes["forward_micro_batch_size"],
        global_batch_size=sizes["global_batch_size"],
        micro_batch_size=sizes["micro_batch_size"],
        epochs=int(ppo.ppo_epochs),
        max_wait_ms=delay_us / 1000.0,
        api_token=ppo.api_token,
    )
    if bool(cfg.exp_manager.get("export_hf", True)):
        app.state.on_shutdown.append(lambda: critic.export_hf(str(log_dir / "hf_export")))
    get_logger().info(f"critic {critic.source} on {fabric.device}; checkpoints in {log_dir / 'checkpoints'}; "
                      f"auth {'on' if app.state.api_token else 'off'}")
    return app, {"host": host, "port": port, "allow_remote": allow_remote, "log_level": str(ppo.log_level)}


def _ready(url: str) -> None:
    print(f"critic server ready at {url} (POST /infer, /train, /save, /load, /reset, /prune; GET /health, /info)",
          flush=True)


def serve(cfg: DictConfig) -> None:
    """Build the app from ``cfg`` and serve it until interrupted."""
    app, serve_kwargs = build(cfg)
    run_server(app, on_ready=_ready, **serve_kwargs)


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_ppo_critic", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(serve, cfg)  # a user's mistake: one clear line, no traceback


if __name__ == "__main__":
    sys.exit(main())
