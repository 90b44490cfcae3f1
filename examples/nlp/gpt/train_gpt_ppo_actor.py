"""PPO of a causal LM against a reward model: the actor job (the master), colocated or served.

Colocated (default; actor, critic, reward model and initial policy in this process)::

    python examples/nlp/gpt/train_gpt_ppo_actor.py \
        pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
        reward_model.restore_from_path=results/rm_quickstart/hf_export \
        trainer.ppo.max_steps=2 model.ppo.num_rollout_samples=4 model.global_batch_size=4

Served (start serve_reward_model.py, serve_ppo_critic.py and serve_initial_policy.py first)::

    python examples/nlp/gpt/train_gpt_ppo_actor.py remote_critic_rm.enable=true \
        remote_critic_rm.reward_model.port=5555 remote_critic_rm.critic.port=5557 \
        remote_critic_rm.initial_policy.port=5556

Configuration: conf/gpt_ppo_actor.yaml (NeMo-Aligner key names). See docs/user-guide/ppo.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.ppo import (
    LocalCritic,
    LocalInitialPolicy,
    PPOConfig,
    PPOTrainer,
    compute_ppo_max_steps,
    reward_fn_from_client,
    reward_fn_from_scorer,
)
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


def build_roles(cfg: DictConfig, fabric, reward_fn=None):
    """Served mode: ``(critic, initial_policy, reward_fn)`` clients of the servers. Colocated mode:
    ``(critic model config, critic checkpoint path, reward_fn)`` (the critic itself is built by :func:`run`)."""
    remote = cfg.remote_critic_rm
    if bool(remote.enable):
        from nemo_aligner.servers.client import RewardModelClient
        from nemo_aligner.servers.critic_server import RemoteCritic
        from nemo_aligner.servers.initial_policy_server import RemoteInitialPolicy

        kwargs = dict(api_token=remote.get("api_token"), timeout=float(remote.timeout))
        url = lambda section: f"http://{section.ip}:{int(section.port)}"  # noqa: E731
        critic = RemoteCritic(url(remote.critic), **kwargs)
        initial = RemoteInitialPolicy(url(remote.initial_policy), **kwargs)
        critic.wait_until_ready(timeout=float(remote.timeout))
        initial.wait_until_ready(timeout=float(remote.timeout))
        if reward_fn is None:
            rm = RewardModelClient(url(remote.reward_model), **kwargs)
            rm.wait_until_ready(timeout=float(remote.timeout))
            reward_fn = reward_fn_from_client(rm)
        return critic, initial, reward_fn

    rm_path = cfg.reward_model.get("restore_from_path")
    if reward_fn is None:
        from nemo_aligner.models.reward_model import RewardScorer

        if not rm_path or not Path(str(rm_path)).is_dir():
            raise FileNotFoundError(f"reward_model.restore_from_path={rm_path!r} is not an RM export directory")
        scorer = RewardScorer.from_pretrained(str(rm_path), device=fabric.device,
                                              micro_batch_size=int(cfg.reward_model.micro_batch_size))
        reward_fn = reward_fn_from_scorer(scorer)
    critic_path = cfg.critic.get("restore_from_path") or rm_path
    if not critic_path:
        raise FileNotFoundError("no critic checkpoint: set critic.restore_from_path or reward_model.restore_from_path")
    critic_model_cfg = OmegaConf.create({
        "optim": OmegaConf.to_container(cfg.critic.optim, resolve=True),
        "attn_implementation": cfg.model.get("attn_implementation", "sdpa"),
        "gradient_checkpointing": cfg.model.get("gradient_checkpointing", False),
    })
    return critic_model_cfg, critic_path, reward_fn


def run(cfg: DictConfig, reward_fn=None) -> dict:
    """Build everything from ``cfg`` and train. ``reward_fn(prompt_ids, response_ids) -> list[float]`` replaces
    the reward model when given (programmatic rewards). Returns ``{"history", "val", "log_dir", "trainer"}``.

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing file; DataFormatError: a bad prompt line;
        ConnectionError: a server is not reachable (served mode); ValueError: an out-of-range value.
    """
    check_keys(cfg, load_schema("gpt_ppo_actor"), source="gpt_ppo_actor config")
    log = get_logger()
    ppo_cfg = PPOConfig.from_cfg(cfg)
    sampling = SamplingParams.from_cfg(cfg.model.ppo.sampling_params)
    length = LengthParams.from_cfg(cfg.model.ppo.length_params)
    exp = cfg.exp_manager
    log_dir = Path(exp.explicit_log_dir)
    ckpt = exp.checkpoint_callback_params
    checkpoints = CheckpointManager(log_dir / "checkpoints", ckpt.save_top_k, ckpt.monitor, ckpt.get("mode", "max"))
    if not exp.resume_if_exists and checkpoints.latest() is not None:
        raise FileExistsError(f"{log_dir} already holds checkpoints; set exp_manager.resume_if_exists=true to continue "
                              "that run or point exp_manager.explicit_log_dir somewhere else")
    served = bool(cfg.remote_critic_rm.enable)
    fabric = build_fabric(cfg.trainer, loggers=build_loggers(log_dir, exp), seed=ppo_cfg.seed)

    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    tokenizer = load_tokenizer(source)
    max_prompt_tokens = int(cfg.model.encoder_seq_length) - length.max_length
    if max_prompt_tokens < 1:
        raise ValueError(f"model.encoder_seq_length={cfg.model.encoder_seq_length} leaves no room for a prompt "
                         f"next to length_params.max_length={length.max_length}")
    data = cfg.model.data
    train_prompts, cut = load_prompt_ids(data.data_prefix.train, tokenizer, max_prompt_tokens, data.get("max_prompts"))
    val_prompts = []
    if as_list(data.data_prefix.get("validation")):
        val_prompts, _ = load_prompt_ids(data.data_prefix.validation, tokenizer, max_prompt_tokens,
                                         data.get("max_val_prompts"))
    max_steps = compute_ppo_max_steps(len(train_prompts), ppo_cfg)
    if fabric.is_global_zero:
        log.info(f"{len(train_prompts)} training prompts ({cut} cut to {max_prompt_tokens} tokens), "
                 f"{len(val_prompts)} validation prompts; {max_steps} PPO steps of {ppo_cfg.num_rollout_samples} rollouts "
                 f"({'served' if served else 'colocated'} mode); logs and checkpoints in {log_dir}")

    precision = normalize_precision(cfg.trainer.precision)
    actor = HFCausalLM(
        fabric, cfg.model, source,
        max_steps=max_steps * ppo_cfg.optimizer_steps_per_ppo_step(),
        gradient_clip_val=ppo_cfg.gradient_clip_val,
        need_reference=not served,
        precision=precision,
    )
    if served:
        critic, initial, reward_fn = build_roles(cfg, fabric, reward_fn)
    else:
        from nemo_aligner.models.critic import HFCritic

        critic_model_cfg, critic_path, reward_fn = build_roles(cfg, fabric, reward_fn)
        model = HFCritic(
            fabric, critic_model_cfg, str(critic_path),
            max_steps=max_steps * ppo_cfg.optimizer_steps_per_ppo_step(ppo_cfg.critic_global_batch_size),
            gradient_clip_val=ppo_cfg.gradient_clip_val,
            loss_clip_val=float(cfg.critic.loss_clip_val),
            precision=precision,
        )
        critic = LocalCritic(model, log_dir / "critic_checkpoints", ppo_cfg.forward_micro_batch_size,
                             ppo_cfg.critic_global_batch_size, ppo_cfg.critic_micro_batch_size, ppo_cfg.ppo_epochs)
        initial = LocalInitialPolicy(actor, ppo_cfg.forward_micro_batch_size)
        if fabric.is_global_zero:
            log.info(f"critic initialised from {critic_path}; initial policy = "
                     f"{'the actor with LoRA adapters off' if actor.use_lora else 'a frozen copy of the actor'}")

    trainer = PPOTrainer(
        actor=actor, critic=critic, initial_policy=initial, reward_fn=reward_fn,
        train_prompts=train_prompts, val_prompts=val_prompts, cfg=ppo_cfg,
        sampling_params=sampling, length_params=length, log_dir=log_dir, checkpoints=checkpoints,
        log_metrics=fabric.log_dict, resume=bool(exp.resume_if_exists), export_hf=bool(exp.get("export_hf", True)),
        is_global_zero=fabric.is_global_zero,
    )
    history = trainer.fit()
    for logger in fabric.loggers:
        logger.finalize("success")
    return {"history": history, "val": trainer.last_val_metrics, "log_dir": str(log_dir), "trainer": trainer}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_ppo_actor", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as err:  # a user's mistake: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
