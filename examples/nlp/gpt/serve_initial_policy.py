"""Serve the frozen initial policy of a served-mode PPO run (default http://127.0.0.1:5556).

    python examples/nlp/gpt/serve_initial_policy.py \
        pretrained_checkpoint.restore_from_path=smollm2-135m-instruct inference.port=5556

``POST /logprobs`` ``{"token_ids": [[...]], "prompt_lengths": [...]}`` -> ``{"logprobs": [[...]]}`` (the
response-token log-probabilities the actor's KL penalty needs). Configuration: conf/inference_initial_policy.yaml.
See docs/user-guide/ppo.md.
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from nemo_aligner.recipes.common import run_or_exit
from nemo_aligner.servers.app import check_api_token, check_host, check_port, run_server
from nemo_aligner.utils.config import CONF_DIR, check_keys, load_schema, number
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import normalize_precision


def build(cfg: DictConfig):
    """Check ``cfg``, load the policy and build the app: ``(app, serve_kwargs)``.

    Raises:
        ConfigKeyError: an unknown key; ValueError: a non-loopback host without ``allow_remote``, a port outside
            0..65535, a blank api_token, ``micro_batch_size < 1`` or ``max_wait_ms < 0`` (all before the policy
            loads).
    """
    check_keys(cfg, load_schema("inference_initial_policy"), source="inference_initial_policy config")
    inf = cfg.inference
    host, allow_remote = str(inf.host), bool(inf.allow_remote)
    check_host(host, allow_remote)
    port = check_port(inf.port, "inference.port")
    check_api_token(inf.api_token, "inference.api_token")
    micro_batch_size = number(int, 1)(inf.micro_batch_size, "inference.micro_batch_size")
    max_wait_ms = number(float, 0)(inf.max_wait_ms, "inference.max_wait_ms")
    from nemo_aligner.servers.initial_policy_server import InitialPolicyScorer, build_initial_policy_app

    accelerator = str(cfg.trainer.accelerator)
    device = "cuda" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    precision = normalize_precision(cfg.trainer.precision)
    scorer = InitialPolicyScorer.from_pretrained(
        str(cfg.pretrained_checkpoint.restore_from_path), cfg.model, "bf16-true" if precision.startswith("bf16") else "32-true", device
    )
    app = build_initial_policy_app(scorer, micro_batch_size, max_wait_ms, inf.api_token)
    get_logger().info(f"initial policy {scorer.source} on {device}; auth {'on' if app.state.api_token else 'off'}")
    return app, {"host": host, "port": port, "allow_remote": allow_remote, "log_level": str(inf.log_level)}


def _ready(url: str) -> None:
    print(f"initial policy server ready at {url} (POST /logprobs; GET /health, /info)", flush=True)


def serve(cfg: DictConfig) -> None:
    """Build the app from ``cfg`` and serve it until interrupted."""
    app, serve_kwargs = build(cfg)
    run_server(app, on_ready=_ready, **serve_kwargs)


@hydra.main(config_path=str(CONF_DIR), config_name="inference_initial_policy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(serve, cfg)  # a user's mistake: one clear line, no traceback


if __name__ == "__main__":
    sys.exit(main())
