"""Rejection sampling (best-of-n fine-tuning) of a causal LM against a reward model.

Local reward model (default)::

    python examples/nlp/gpt/train_gpt_rs_actor.py \
        pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
        reward_model.restore_from_path=results/rm_quickstart/hf_export \
        trainer.rs.max_steps=2 model.rs.num_rollout_samples=2 model.rs.num_rollouts_per_prompt=2 \
        model.global_batch_size=2

Reward-model server (start serve_reward_model.py first)::

    python examples/nlp/gpt/train_gpt_rs_actor.py remote_rm.enable=true remote_rm.reward_model.port=5555

Configuration: conf/gpt_rs_actor.yaml (NeMo-Aligner key names). See docs/user-guide/rs.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nemo_aligner.algorithms.ppo import reward_fn_from_client, reward_fn_from_scorer
from nemo_aligner.algorithms.rs import RSConfig, RSTrainer, compute_rs_max_steps
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.prompts import load_prompts, tokenize_prompt_example
from nemo_aligner.generation import LengthParams, SamplingParams
from nemo_aligner.models.hf_causal_lm import HFCausalLM, load_tokenizer
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.utils.config import CONF_DIR, ConfigKeyError, as_list, check_keys, load_schema
from nemo_aligner.utils.logging import build_loggers, get_logger
from nemo_aligner.utils.runtime import build_fabric, normalize_precision

USER_ERRORS = (DataFormatError, ConfigKeyError, FileNotFoundError, FileExistsError, ConnectionError, ValueError)


def load_prompt_ids(paths, tokenizer, max_prompt_tokens: int, max_prompts=None) -> tuple[list[list[int]], int]:
    """Tokenised prompts of ``paths`` (kept to their last ``max_prompt_tokens`` tokens) and how many were cut.

    Raises:
        FileNotFoundError, DataFormatError: as :func:`nemo_aligner.data.prompts.load_prompts`.
    """
    ids, cut = [], 0
    for example in load_prompts(as_list(paths), None if max_prompts is None else int(max_prompts)):
        tokens, truncated = tokenize_prompt_example(example, tokenizer, max_prompt_tokens)
        ids.append(tokens)
        cut += int(truncated)
    return ids, cut


def build_reward_fn(cfg: DictConfig, device, micro_batch_size: int):
    """The reward source: the reward-model server at ``remote_rm.reward_model.{ip,port}`` when
    ``remote_rm.enable``, else a local :class:`~nemo_aligner.models.reward_model.RewardScorer` loaded from
    ``reward_model.restore_from_path``. Returns ``(reward_fn, max_seq_length, description)``; ``max_seq_length``
    is the longest prompt + response the reward model accepts (``None``: no limit).

    Raises:
        FileNotFoundError: no RM export at ``reward_model.restore_from_path``.
        ConnectionError: the server does not answer ``/health`` within ``remote_rm.timeout`` seconds.
    """
    remote = cfg.remote_rm
    if bool(remote.enable):
        from nemo_aligner.servers.client import RewardModelClient

        url = f"http://{remote.reward_model.ip}:{int(remote.reward_model.port)}"
        client = RewardModelClient(url, api_token=remote.get("api_token"), timeout=float(remote.timeout))
        client.wait_until_ready(timeout=float(remote.timeout))
        max_len = client.info().get("max_seq_length")
        return reward_fn_from_client(client), (int(max_len) if max_len else None), f"reward-model server {url}"
    from nemo_aligner.models.reward_model import RewardScorer

    rm_path = cfg.reward_model.get("restore_from_path")
    if not rm_path or not Path(str(rm_path)).is_dir():
        raise FileNotFoundError(f"reward_model.restore_from_path={rm_path!r} is not an RM export directory "
                                "(or set remote_rm.enable=true to use the reward-model server)")
    scorer = RewardScorer.from_pretrained(str(rm_path), device=device, micro_batch_size=micro_batch_size)
    return reward_fn_from_scorer(scorer, micro_batch_size), scorer.max_seq_length, f"local reward model {rm_path}"


def run(cfg: DictConfig, reward_fn=None) -> dict:
    """Build everything from ``cfg`` and train. ``reward_fn(prompt_ids, response_ids) -> list[float]`` replaces
    the reward model when given (programmatic rewards). Returns ``{"history", "val", "initial_val", "log_dir",
    "trainer"}``.

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing file or RM export; DataFormatError: a bad
        prompt line; ConnectionError: the reward-model server is not reachable; ValueError: an out-of-range value;
        FileExistsError: checkpoints exist and ``exp_manager.resume_if_exists=false``.
    """
    check_keys(cfg, load_schema("gpt_rs_actor"), source="gpt_rs_actor config")
    log = get_logger()
    rs_cfg = RSConfig.from_cfg(cfg)
    sampling = SamplingParams.from_cfg(cfg.model.rs.sampling_params)
    length = LengthParams.from_cfg(cfg.model.rs.length_params)
    exp = cfg.exp_manager
    log_dir = Path(exp.explicit_log_dir)
    ckpt = exp.checkpoint_callback_params
    checkpoints = CheckpointManager(log_dir / "checkpoints", ckpt.save_top_k, ckpt.monitor, ckpt.get("mode", "max"))
    if not exp.resume_if_exists and checkpoints.latest() is not None:
        raise FileExistsError(f"{log_dir} already holds checkpoints; set exp_manager.resume_if_exists=true to continue "
                              "that run or point exp_manager.explicit_log_dir somewhere else")
    fabric = build_fabric(cfg.trainer, loggers=build_loggers(log_dir, exp), seed=rs_cfg.seed)

    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    tokenizer = load_tokenizer(source)
    rm_max_len = None
    if reward_fn is None:
        reward_fn, rm_max_len, reward_source = build_reward_fn(cfg, fabric.device, rs_cfg.forward_micro_batch_size)
    else:
        reward_source = "a programmatic reward function"
    seq_len = int(cfg.model.encoder_seq_length)
    if rm_max_len is not None and rm_max_len < seq_len:
        seq_len = rm_max_len  # every prompt + response must fit the reward model too
    max_prompt_tokens = seq_len - length.max_length
    if max_prompt_tokens < 1:
        raise ValueError(f"a sequence limit of {seq_len} tokens (model.encoder_seq_length, or the reward model's "
                         f"max_seq_length when smaller) leaves no room for a prompt next to "
                         f"length_params.max_length={length.max_length}")
    data = cfg.model.data
    train_prompts, cut = load_prompt_ids(data.data_prefix.train, tokenizer, max_prompt_tokens, data.get("max_prompts"))
    val_prompts = []
    if as_list(data.data_prefix.get("validation")):
        val_prompts, _ = load_prompt_ids(data.data_prefix.validation, tokenizer, max_prompt_tokens,
                                         data.get("max_val_prompts"))
    max_steps = compute_rs_max_steps(len(train_prompts), rs_cfg)
    if fabric.is_global_zero:
        log.info(f"{len(train_prompts)} training prompts ({cut} cut to {max_prompt_tokens} tokens), "
                 f"{len(val_prompts)} validation prompts; {max_steps} RS steps of {rs_cfg.num_rollout_samples} prompts "
                 f"x {rs_cfg.num_rollouts_per_prompt} responses, best {rs_cfg.top_n_rollouts} kept; reward from "
                 f"{reward_source}; logs and checkpoints in {log_dir}")

    policy = HFCausalLM(
        fabric, cfg.model, source,
        max_steps=max_steps * rs_cfg.optimizer_steps_per_rs_step(),
        gradient_clip_val=rs_cfg.gradient_clip_val,
        need_reference=False,
        precision=normalize_precision(cfg.trainer.precision),
    )
    trainer = RSTrainer(
        policy=policy, reward_fn=reward_fn, train_prompts=train_prompts, val_prompts=val_prompts, cfg=rs_cfg,
        sampling_params=sampling, length_params=length, log_dir=log_dir, checkpoints=checkpoints,
        log_metrics=fabric.log_dict, resume=bool(exp.resume_if_exists), export_hf=bool(exp.get("export_hf", True)),
        is_global_zero=fabric.is_global_zero,
    )
    history = trainer.fit()
    for logger in fabric.loggers:
        logger.finalize("success")
    return {"history": history, "val": trainer.last_val_metrics, "initial_val": trainer.initial_val_metrics,
            "log_dir": str(log_dir), "trainer": trainer}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_rs_actor", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as err:  # a user's mistake: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
