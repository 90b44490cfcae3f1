"""Serve a trained reward model over HTTP (default http://127.0.0.1:5555).

    python examples/nlp/gpt/serve_reward_model.py rm_model_file=results/rm/export \
        inference.micro_batch_size=8 inference.port=5555

    curl -s http://127.0.0.1:5555/score -H 'Content-Type: application/json' \
        -d '{"prompts": ["What is 2+2?"], "responses": ["4."]}'

Configuration: conf/inference_rm.yaml (NeMo-Aligner key names). The server listens on loopback only unless
``inference.allow_remote=true``; set ``inference.api_token`` (or ``$NEMO_ALIGNER_API_TOKEN``) to require a bearer
token. See docs/user-guide/rm_server.md for the API and the error codes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from nemo_aligner.errors import MissingFileError
from nemo_aligner.recipes.common import run_or_exit
from nemo_aligner.servers.app import ServerLimits, check_api_token, check_host, check_port, run_server
from nemo_aligner.servers.reward_model_server import build_reward_model_app
from nemo_aligner.utils.config import CONF_DIR, ConfigValueError, check_keys, load_schema, number
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import normalize_precision


def _device(accelerator: str) -> str:
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigValueError("trainer.accelerator=gpu but no CUDA device is visible; use trainer.accelerator=cpu")
        return "cuda"
    if accelerator == "cpu":
        return "cpu"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    raise ConfigValueError(f"trainer.accelerator={accelerator!r}: use auto, cpu or gpu")


def _dtype(precision, device: str) -> torch.dtype:
    name = normalize_precision(precision)
    if name.startswith("bf16"):
        return torch.bfloat16
    if name.startswith("16"):
        return torch.bfloat16 if device == "cpu" else torch.float16  # CPU kernels lack float16 for many ops
    return torch.float32


def _int_key(inf, key: str, low: int) -> int:
    value = inf.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigValueError(f"inference.{key} must be an integer >= {low}, got {value!r}")
    return value


def _limits(inf) -> ServerLimits:
    """:class:`ServerLimits` from ``inference.{request_timeout_s,keep_alive_timeout_s,max_connections}``.

    Raises:
        ValueError: a value out of range, naming its config key.
    """
    try:
        return ServerLimits(
            request_timeout_s=inf.request_timeout_s,
            keep_alive_timeout_s=inf.keep_alive_timeout_s,
            max_connections=inf.max_connections,
        )
    except ValueError as err:
        raise ConfigValueError(f"inference.{err}") from None


def build(cfg: DictConfig):
    """Check ``cfg``, load the reward model and build the app.

    Returns:
        ``(app, serve_kwargs)`` where ``serve_kwargs`` holds ``host``, ``port``, ``allow_remote`` and ``log_level``
        for :func:`nemo_aligner.servers.app.run_server`.

    Raises:
        ConfigKeyError: an unknown key. FileNotFoundError: no model path or no export there. ValueError: bad values
            (e.g. a non-loopback host without ``inference.allow_remote``, ``trainer.devices != 1``, a port outside
            0..65535, a blank ``inference.api_token``), all checked before the model loads.
    """
    check_keys(cfg, load_schema("inference_rm"), source="inference_rm config")
    inf = cfg.inference
    host, allow_remote = str(inf.host), bool(inf.allow_remote)
    check_host(host, allow_remote)  # fail before the (slow) model load
    port = check_port(inf.port, "inference.port")
    check_api_token(inf.api_token, "inference.api_token")
    micro_batch_size = number(int, 1)(inf.micro_batch_size, "inference.micro_batch_size")
    max_items_per_request = number(int, 1)(inf.max_items_per_request, "inference.max_items_per_request")
    max_wait_ms = number(float, 0)(inf.max_wait_ms, "inference.max_wait_ms")
    if int(cfg.trainer.devices) != 1 or int(cfg.trainer.num_nodes) != 1:
        raise ConfigValueError(
            "the reward-model server runs one replica per process: set trainer.devices=1 trainer.num_nodes=1 "
            "(start one server per GPU, e.g. with CUDA_VISIBLE_DEVICES and different inference.port values)"
        )
    path = cfg.get("rm_model_file") or cfg.pretrained_checkpoint.get("restore_from_path")
    if not path:
        raise MissingFileError("no reward model given: set rm_model_file=<export dir of train_reward_model.py>")
    if not Path(str(path)).is_dir():
        raise MissingFileError(f"reward model export {path} is not a directory")

    from nemo_aligner.models.reward_model import RewardScorer

    device = _device(cfg.trainer.accelerator)
    dtype = _dtype(cfg.model.get("precision", cfg.trainer.precision), device)
    limits = _limits(inf)  # before the model load: a bad value fails fast
    max_request_bytes = None if inf.max_request_bytes is None else _int_key(inf, "max_request_bytes", 1)
    scorer = RewardScorer.from_pretrained(str(path), device=device, dtype=dtype, micro_batch_size=micro_batch_size)
    std_cfg = cfg.model.reward_standardization
    if bool(std_cfg.enable):
        if std_cfg.mean is None or std_cfg.std is None or not float(std_cfg.std) > 0:
            raise ConfigValueError("model.reward_standardization.enable=true needs a mean and a std > 0")
        scorer.mean, scorer.std = float(std_cfg.mean), float(std_cfg.std)
    app = build_reward_model_app(
        scorer,
        micro_batch_size=micro_batch_size,
        max_wait_ms=max_wait_ms,
        api_token=inf.api_token,
        max_items_per_request=max_items_per_request,
        model_name=str(path),
        max_request_bytes=max_request_bytes,
        limits=limits,
    )
    log = get_logger()
    log.info(
        f"reward model {path} on {device} ({dtype}), max_seq_length {scorer.max_seq_length}, "
        f"micro-batch {micro_batch_size}, max wait {max_wait_ms} ms, "
        f"auth {'on' if app.state.api_token else 'off'}"
    )
    return app, {"host": host, "port": port, "allow_remote": allow_remote, "log_level": str(inf.log_level)}


def _ready(url: str) -> None:
    print(f"reward model server ready at {url} (POST {url}/score, GET {url}/health, GET {url}/info)", flush=True)


def serve(cfg: DictConfig) -> None:
    """Build the app from ``cfg`` and serve it until interrupted."""
    app, serve_kwargs = build(cfg)
    run_server(app, on_ready=_ready, **serve_kwargs)


@hydra.main(config_path=str(CONF_DIR), config_name="inference_rm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(serve, cfg)


if __name__ == "__main__":
    sys.exit(main())
