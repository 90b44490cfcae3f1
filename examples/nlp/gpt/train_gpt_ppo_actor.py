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

On Ray (critic, reward model and initial policy -- and with ``trainer.ppo.vllm.enable=true`` the vLLM rollout
engine -- as Ray actors in one placement group; docs/user-guide/ray.md)::

    python examples/nlp/gpt/train_gpt_ppo_actor.py trainer.ppo.ray.enable=true \
        "trainer.ppo.ray.colocate=[[critic,reward_model,initial_policy]]"

    # the actor itself as 2 data-parallel Ray Train workers (one torch.distributed group), sharing those roles
    python examples/nlp/gpt/train_gpt_ppo_actor.py trainer.ppo.ray.enable=true trainer.ppo.ray.num_actor_workers=2

Configuration: conf/gpt_ppo_actor.yaml (NeMo-Aligner key names). See docs/user-guide/ppo.md.
"""

from __future__ import annotations

import contextlib
import sys

import hydra
from omegaconf import DictConfig

from nemo_aligner.algorithms.online import RolloutSetup
from nemo_aligner.algorithms.ppo import LocalInitialPolicy, PPOConfig, PPOTrainer, compute_ppo_max_steps
from nemo_aligner.data.prompts import end_of_turn_rule, load_train_val_prompt_ids, prompt_token_budget
from nemo_aligner.generation import LengthParams, SamplingParams
from nemo_aligner.models.hf_causal_lm import HFCausalLM, load_tokenizer
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.recipes.common import (
    check_config,
    checkpoint_manager,
    finish,
    run_context,
    run_or_exit,
    setup_fabric,
    use_rollout_engine,
)
from nemo_aligner.recipes.ray_ppo import RayCritic, RayInitialPolicy, RayRoles, actor_worker_context
from nemo_aligner.recipes.online import build_reward_fn, colocated_critic, served_ppo_roles, server_url
from nemo_aligner.utils.config import CONF_DIR
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import normalize_precision


def reward_source(cfg: DictConfig, fabric, reward_fn=None):
    """``(reward_fn, max_seq_length, description)``: the given programmatic ``reward_fn`` (no length limit), else
    the reward-model server at ``remote_critic_rm.reward_model`` (served mode) or the local RM export at
    ``reward_model.restore_from_path`` (colocated), see :func:`nemo_aligner.recipes.online.build_reward_fn`."""
    if reward_fn is not None:
        return reward_fn, None, "a programmatic reward function"
    remote = cfg.remote_critic_rm
    return build_reward_fn(
        cfg.reward_model.get("restore_from_path"), fabric.device, int(cfg.reward_model.micro_batch_size),
        remote_url=server_url(remote.reward_model) if bool(remote.enable) else None, api_token=remote.get("api_token"),
        timeout=float(remote.timeout), remote_key="remote_critic_rm.enable",
    )


def run(cfg: DictConfig, reward_fn=None) -> dict:
    """Build everything from ``cfg`` and train. ``reward_fn(prompt_ids, response_ids) -> list[float]`` replaces
    the reward model when given (programmatic rewards). Returns ``{"history", "val", "log_dir", "trainer", "ray_roles"}`` (``ray_roles``: the
    :class:`~nemo_aligner.recipes.ray_ppo.RayRoles` of a Ray run, already shut down; else None).

    Prompts keep their last ``min(model.encoder_seq_length, the reward model's max_seq_length) -
    length_params.max_length`` tokens, so every rollout fits the actor and the reward model.

    Raises:
        UserError: (:mod:`nemo_aligner.errors`) a user's mistake, e.g. ConfigKeyError: an unknown key;
        MissingFileError: a missing file; DataFormatError: a bad prompt line; ServerUnavailableError: a server is
        not reachable (served mode); RayWorkerDiedError: a role's Ray actor died (Ray mode); ConfigValueError: an out-of-range value; OutputExistsError: checkpoints exist
        and ``exp_manager.resume_if_exists=false``.
    """
    check_config(cfg, "gpt_ppo_actor")
    ppo_cfg = PPOConfig.from_cfg(cfg)
    log_dir, checkpoints = checkpoint_manager(cfg.exp_manager)
    in_actor_worker = actor_worker_context()
    if in_actor_worker is not None:  # one rank of trainer.ppo.ray.num_actor_workers: the driver's role actors
        roles, reward_fn = in_actor_worker
        return _train(cfg, reward_fn, ppo_cfg, log_dir, checkpoints, roles)
    on_ray = bool(cfg.trainer.ppo.ray.enable)
    with contextlib.ExitStack() as stack:  # on Ray: the role actors and their placement group go away at the end
        roles = stack.enter_context(RayRoles.start(cfg, reward_fn is None, log_dir)) if on_ray else None
        if roles is not None and roles.num_actor_workers > 1:
            return _run_actor_workers(cfg, reward_fn, ppo_cfg, roles)
        return _train(cfg, reward_fn, ppo_cfg, log_dir, checkpoints, roles)


def _training_prompts(cfg: DictConfig, tokenizer, length: LengthParams, rm_max_len: int | None):
    """``(train prompts, validation prompts, number cut, max prompt tokens)``: the prompt files tokenised, each
    prompt keeping its last tokens so that it and its response fit the actor and the reward model."""
    end_of_turn = end_of_turn_rule(tokenizer)  # an ended chat turn is scored with its suffix (ChatML: "\n")
    max_prompt_tokens = prompt_token_budget(cfg.model.encoder_seq_length, length.max_length, rm_max_len,
                                            len(end_of_turn.suffix_ids) if end_of_turn else 0)
    train_prompts, val_prompts, cut = load_train_val_prompt_ids(cfg.model.data, tokenizer, max_prompt_tokens)
    return train_prompts, val_prompts, cut, max_prompt_tokens


def _run_actor_workers(cfg, reward_fn, ppo_cfg, roles: RayRoles) -> dict:
    """The driver of ``trainer.ppo.ray.num_actor_workers`` > 1: start every role actor (the critic's LR schedule
    needs the run's PPO steps, counted here from the prompts as each rank counts them), then run the actor's ranks
    as Ray Train workers (:meth:`RayRoles.run_actor_workers`); rank 0's result, with this process's ``roles``."""
    for role in roles.roles:  # the vLLM engines, one per actor rank (trainer.ppo.vllm.enable=true), start first
        if role.startswith("rollout"):
            roles.spawn(role)
    roles.spawn("initial_policy")
    if reward_fn is None:
        roles.spawn("reward_model")
        _, rm_max_len, _ = roles.reward_source()
    else:
        rm_max_len = None
    tokenizer = load_tokenizer(resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path)))
    train_prompts = _training_prompts(cfg, tokenizer, LengthParams.from_cfg(cfg.model.ppo.length_params),
                                      rm_max_len)[0]
    roles.spawn("critic", compute_ppo_max_steps(len(train_prompts), ppo_cfg))
    for role in roles.roles:
        roles.handle(role)  # built (a user's mistake in a role is raised here, before the workers start)
    result = roles.run_actor_workers(cfg, __file__, reward_fn)
    return {**result, "ray_roles": roles}


def _train(cfg, reward_fn, ppo_cfg, log_dir, checkpoints, roles: RayRoles | None) -> dict:
    """The body of :func:`run`; ``roles`` holds the Ray actors of the critic, reward model and initial policy
    (``trainer.ppo.ray.enable``), else None."""
    log = get_logger()
    exp = cfg.exp_manager
    sampling = SamplingParams.from_cfg(cfg.model.ppo.sampling_params)
    length = LengthParams.from_cfg(cfg.model.ppo.length_params)
    served = bool(cfg.remote_critic_rm.enable)
    mode = "served" if served else "Ray" if roles is not None else "colocated"
    if roles is not None:  # the roles load in their Ray actors while this process loads the actor
        if "rollout" in roles.roles:
            roles.spawn("rollout")  # the vLLM engine (trainer.ppo.vllm.enable=true); its start-up takes longest
        roles.spawn("initial_policy")
        if reward_fn is None:
            roles.spawn("reward_model")
    fabric = setup_fabric(cfg, log_dir)

    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    tokenizer = load_tokenizer(source)
    if roles is not None and reward_fn is None:
        reward_fn, rm_max_len, reward_desc = roles.reward_source()
    else:
        reward_fn, rm_max_len, reward_desc = reward_source(cfg, fabric, reward_fn)
    train_prompts, val_prompts, cut, max_prompt_tokens = _training_prompts(cfg, tokenizer, length, rm_max_len)
    max_steps = compute_ppo_max_steps(len(train_prompts), ppo_cfg)
    if fabric.is_global_zero:
        log.info(f"{len(train_prompts)} training prompts ({cut} cut to {max_prompt_tokens} tokens), "
                 f"{len(val_prompts)} validation prompts; {max_steps} PPO steps of {ppo_cfg.num_rollout_samples} "
                 f"rollouts ({mode} mode, {fabric.world_size} rank(s)); reward from {reward_desc}; "
                 f"logs and checkpoints in {log_dir}")

    precision = normalize_precision(cfg.trainer.precision)
    actor = HFCausalLM(
        fabric, cfg.model, source,
        max_steps=max_steps * ppo_cfg.optimizer_steps_per_ppo_step(),
        gradient_clip_val=ppo_cfg.gradient_clip_val,
        need_reference=not served and roles is None,
        precision=precision,
    )
    if served:
        critic, initial = served_ppo_roles(cfg.remote_critic_rm)
    elif roles is not None:
        roles.spawn("critic", max_steps)
        critic, initial = RayCritic(roles.handle("critic")), RayInitialPolicy(roles.handle("initial_policy"))
        if fabric.is_global_zero:
            log.info(f"Ray roles {roles.groups} (one placement-group bundle of {roles.resources} per group)")
    else:
        critic, critic_path = colocated_critic(cfg, fabric, ppo_cfg, max_steps, precision, log_dir)
        initial = LocalInitialPolicy(actor, ppo_cfg.forward_micro_batch_size)
        if fabric.is_global_zero:
            log.info(f"critic initialised from {critic_path}; initial policy = "
                     f"{'the actor with LoRA adapters off' if actor.use_lora else 'a frozen copy of the actor'}")

    use_rollout_engine(actor, cfg.trainer.ppo.get("vllm"), "trainer.ppo.vllm", log,
                       engine=(roles.rollout_engine(actor.data_parallel_rank)
                               if roles is not None and "rollout" in roles.roles else None))
    trainer = PPOTrainer(
        actor=actor, critic=critic, initial_policy=initial, reward_fn=reward_fn,
        setup=RolloutSetup(train_prompts, val_prompts, sampling_params=sampling, length_params=length),
        cfg=ppo_cfg, context=run_context(fabric, exp, log_dir, checkpoints),
    )
    history = trainer.fit()
    finish(fabric, checkpoints)
    return {"history": history, "val": trainer.last_val_metrics, "log_dir": str(log_dir), "trainer": trainer,
            "ray_roles": roles}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_ppo_actor", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)  # a user's mistake: one clear line, no traceback


if __name__ == "__main__":
    sys.exit(main())
