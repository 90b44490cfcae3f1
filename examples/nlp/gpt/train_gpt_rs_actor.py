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

import hydra
from omegaconf import DictConfig

from nemo_aligner.algorithms.online import RolloutSetup
from nemo_aligner.algorithms.rs import RSConfig, RSTrainer, compute_rs_max_steps
from nemo_aligner.data.prompts import end_of_turn_rule, load_train_val_prompt_ids, prompt_token_budget
from nemo_aligner.generation import LengthParams, SamplingParams
from nemo_aligner.models.hf_causal_lm import HFCausalLM, load_tokenizer
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.errors import UnsupportedError
from nemo_aligner.recipes import ray_train
from nemo_aligner.recipes.common import (
    check_config,
    checkpoint_manager,
    finish,
    run_context,
    run_or_exit,
    setup_fabric,
    use_rollout_engine,
)
from nemo_aligner.recipes.online import build_reward_fn, server_url
from nemo_aligner.utils.config import CONF_DIR
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import normalize_precision


def reward_source(cfg: DictConfig, fabric, micro_batch_size: int, reward_fn=None):
    """``(reward_fn, max_seq_length, description)``: the given programmatic ``reward_fn`` (no length limit), else
    the reward-model server at ``remote_rm.reward_model.{ip,port}`` when ``remote_rm.enable``, else the local RM
    export at ``reward_model.restore_from_path`` scoring in micro-batches of ``micro_batch_size``; see
    :func:`nemo_aligner.recipes.online.build_reward_fn`.

    Raises:
        MissingFileError: no RM export at ``reward_model.restore_from_path``.
        ServerUnavailableError: the server does not answer ``/health`` within ``remote_rm.timeout`` seconds.
    """
    if reward_fn is not None:
        return reward_fn, None, "a programmatic reward function"
    remote = cfg.remote_rm
    url = server_url(remote.reward_model) if bool(remote.enable) else None
    return build_reward_fn(cfg.reward_model.get("restore_from_path"), fabric.device, micro_batch_size, remote_url=url,
                           api_token=remote.get("api_token"), timeout=float(remote.timeout))


def run(cfg: DictConfig, reward_fn=None) -> dict:
    """Build everything from ``cfg`` and train. ``reward_fn(prompt_ids, response_ids) -> list[float]`` replaces
    the reward model when given (programmatic rewards). Returns ``{"history", "val", "initial_val", "log_dir",
    "trainer"}``.

    Prompts keep their last ``min(model.encoder_seq_length, the reward model's max_seq_length) -
    length_params.max_length`` tokens, so every rollout fits the policy and the reward model.

    Raises:
        UserError: (:mod:`nemo_aligner.errors`) a user's mistake, e.g. ConfigKeyError: an unknown key;
        MissingFileError: a missing file or RM export; DataFormatError: a bad prompt line; ServerUnavailableError:
        the reward-model server is not reachable; ConfigValueError: an out-of-range value; OutputExistsError:
        checkpoints exist and ``exp_manager.resume_if_exists=false``.
    """
    check_config(cfg, "gpt_rs_actor")
    if ray_train.wants_launch(cfg):  # trainer.ray.enable: this same run() on Ray Train workers (data-parallel ranks)
        if reward_fn is not None:
            raise UnsupportedError("trainer.ray.enable=true with a programmatic reward_fn: the Ray Train workers "
                                   "score with reward_model.restore_from_path (or remote_rm); pass no reward_fn")
        return ray_train.launch(cfg, "gpt_rs_actor", __file__)
    log = get_logger()
    rs_cfg = RSConfig.from_cfg(cfg)
    sampling = SamplingParams.from_cfg(cfg.model.rs.sampling_params)
    length = LengthParams.from_cfg(cfg.model.rs.length_params)
    exp = cfg.exp_manager
    log_dir, checkpoints = checkpoint_manager(exp)
    fabric = setup_fabric(cfg, log_dir)

    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    tokenizer = load_tokenizer(source)
    reward_fn, rm_max_len, reward_desc = reward_source(cfg, fabric, rs_cfg.forward_micro_batch_size, reward_fn)
    end_of_turn = end_of_turn_rule(tokenizer)  # an ended chat turn is scored with its suffix (ChatML: "\n")
    max_prompt_tokens = prompt_token_budget(cfg.model.encoder_seq_length, length.max_length, rm_max_len,
                                            len(end_of_turn.suffix_ids) if end_of_turn else 0)
    train_prompts, val_prompts, cut = load_train_val_prompt_ids(cfg.model.data, tokenizer, max_prompt_tokens)
    max_steps = compute_rs_max_steps(len(train_prompts), rs_cfg)
    if fabric.is_global_zero:
        log.info(f"{len(train_prompts)} training prompts ({cut} cut to {max_prompt_tokens} tokens), "
                 f"{len(val_prompts)} validation prompts; {max_steps} RS steps of {rs_cfg.num_rollout_samples} prompts "
                 f"x {rs_cfg.num_rollouts_per_prompt} responses, best {rs_cfg.top_n_rollouts} kept; reward from "
                 f"{reward_desc}; logs and checkpoints in {log_dir}")

    policy = HFCausalLM(
        fabric, cfg.model, source,
        max_steps=max_steps * rs_cfg.optimizer_steps_per_rs_step(),
        gradient_clip_val=rs_cfg.gradient_clip_val,
        need_reference=False,
        precision=normalize_precision(cfg.trainer.precision),
    )
    use_rollout_engine(policy, cfg.trainer.rs.get("vllm"), "trainer.rs.vllm", log)
    trainer = RSTrainer(
        policy=policy, reward_fn=reward_fn,
        setup=RolloutSetup(train_prompts, val_prompts, sampling_params=sampling, length_params=length),
        cfg=rs_cfg, context=run_context(fabric, exp, log_dir, checkpoints),
    )
    history = trainer.fit()
    finish(fabric, checkpoints)
    return {"history": history, "val": trainer.last_val_metrics, "initial_val": trainer.initial_val_metrics,
            "log_dir": str(log_dir), "trainer": trainer}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_rs_actor", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)  # a user's mistake: one clear line, no traceback


if __name__ == "__main__":
    sys.exit(main())
