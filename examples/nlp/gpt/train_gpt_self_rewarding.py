"""Self-rewarding / meta-rewarding training of a causal LM that judges its own responses (LLM-as-a-judge).

Two iterations of a few steps on CPU (see scripts/quickstart_self_rewarding.sh for the quick start)::

    python examples/nlp/gpt/train_gpt_self_rewarding.py \
        pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
        trainer.self_rewarding.max_iterations=2 trainer.self_rewarding.limit_train_batches=2 \
        model.global_batch_size=2 model.spin.length_params.max_length=48 model.spin.judge_max_length=32 \
        model.data.max_prompts=8 exp_manager.explicit_log_dir=results/self_rewarding

Configuration: conf/gpt_self_rewarding.yaml (NeMo-Aligner key names). See docs/user-guide/self_rewarding.md.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.self_rewarding import (
    SelfRewardingConfig,
    SelfRewardingTrainer,
    compute_self_rewarding_max_steps,
    load_prompts_with_answers,
)
from nemo_aligner.data.prompts import prompt_token_budget
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
from nemo_aligner.servers.openai_judge import OpenAIJudge
from nemo_aligner.utils.config import CONF_DIR, as_list
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import normalize_precision


def load_judge_model(fabric, cfg: DictConfig, path: str) -> HFCausalLM:
    """The separate judge of ``model.spin.judge_model_path`` (a checkpoint directory or a model alias), frozen, on
    the trainer's device and precision, with the native engine and without LoRA (it is never trained)."""
    judge_cfg = OmegaConf.create({"attn_implementation": cfg.model.get("attn_implementation", "sdpa"),
                                  "optim": {"name": "adamw", "lr": 0.0}, "peft": {"peft_scheme": "none"}})
    judge = HFCausalLM(fabric, judge_cfg, resolve_pretrained(path), max_steps=1, gradient_clip_val=0.0,
                       need_reference=False, precision=normalize_precision(cfg.trainer.precision))
    judge.freeze()
    return judge


def run(cfg: DictConfig, policy_wrapper=None, judge_wrapper=None) -> dict:
    """Build everything from ``cfg`` and train. ``policy_wrapper(policy) -> policy`` (tests) may put a deterministic
    engine in front of the policy's ``generate``, and ``judge_wrapper`` in front of a ``judge_model_path`` judge's.
    Returns ``{"history", "val", "log_dir", "trainer"}``.

    Raises:
        UserError: (:mod:`nemo_aligner.errors`) ConfigKeyError / ConfigValueError: a bad key or value;
        MissingFileError / DataFormatError: a missing or bad prompt file; MissingDependencyError: vLLM requested but not installed;
        OutputExistsError: checkpoints exist and ``exp_manager.resume_if_exists=false``.
    """
    check_config(cfg, "gpt_self_rewarding")
    if ray_train.wants_launch(cfg):  # trainer.ray.enable: this same run() on Ray Train workers (data-parallel ranks)
        if policy_wrapper is not None or judge_wrapper is not None:
            raise UnsupportedError("trainer.ray.enable=true with a policy_wrapper or judge_wrapper: the Ray Train "
                                   "workers build their own policy and judge")
        return ray_train.launch(cfg, "gpt_self_rewarding", __file__)
    log = get_logger()
    sr_cfg = SelfRewardingConfig.from_cfg(cfg)
    sampling = SamplingParams.from_cfg(cfg.model.spin.sampling_params)
    length = LengthParams.from_cfg(cfg.model.spin.length_params)
    exp = cfg.exp_manager
    log_dir, checkpoints = checkpoint_manager(exp)
    fabric = setup_fabric(cfg, log_dir, "gpt_self_rewarding")

    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    tokenizer = load_tokenizer(source)
    max_prompt_tokens = prompt_token_budget(cfg.model.encoder_seq_length, length.max_length)
    data = cfg.model.data
    train, cut = load_prompts_with_answers(data.train_ds.file_path, tokenizer, max_prompt_tokens,
                                           data.get("max_prompts"), sr_cfg.normalise_prompt)
    val = []
    if as_list(data.validation_ds.get("file_path")):
        val, _ = load_prompts_with_answers(data.validation_ds.file_path, tokenizer, max_prompt_tokens,
                                           data.get("max_val_prompts"), sr_cfg.normalise_prompt)
    max_steps, per_epoch = compute_self_rewarding_max_steps(len(train), sr_cfg)
    if fabric.is_global_zero:
        log.info(f"{len(train)} training prompts ({cut} cut to {max_prompt_tokens} tokens), {len(val)} validation "
                 f"prompts; {max_steps} steps ({sr_cfg.max_iterations} iterations x {sr_cfg.max_epochs} epochs x "
                 f"{per_epoch} steps) of {sr_cfg.global_batch_size} prompts x {sr_cfg.num_responses_to_gen} responses "
                 f"x {sr_cfg.num_evals_to_average} judgements; meta-judge "
                 f"{'on' if sr_cfg.use_meta_judge else 'off'}, constrained judge "
                 f"{'on' if sr_cfg.constrain_judge_output else 'off'}; logs and checkpoints in {log_dir}")

    policy = HFCausalLM(
        fabric, cfg.model, source,
        max_steps=max_steps,
        gradient_clip_val=sr_cfg.gradient_clip_val,
        need_reference=True,
        precision=normalize_precision(cfg.trainer.precision),
    )
    # generation and judging with vLLM when trainer.self_rewarding.vllm.enable (the engine holds the reference
    # weights while the trainer generates inside policy.reference_weights())
    use_rollout_engine(policy, cfg.trainer.self_rewarding.get("vllm"), "trainer.self_rewarding.vllm", log)
    if policy_wrapper is not None:
        policy = policy_wrapper(policy)
    judge, judge_model = None, None
    if sr_cfg.judge_model_path:  # a separate judge model in this process
        judge_model = load_judge_model(fabric, cfg, sr_cfg.judge_model_path)
        if judge_wrapper is not None:
            judge_model = judge_wrapper(judge_model)
        if fabric.is_global_zero:
            log.info(f"judge: {sr_cfg.judge_model_path} in this process, native engine (the policy does not judge)")
    if sr_cfg.judge_endpoint:  # a separate judge behind an OpenAI-compatible endpoint
        judge = OpenAIJudge(sr_cfg.judge_endpoint, sr_cfg.judge_model, sr_cfg.judge_api_key_env,
                            max_concurrency=sr_cfg.judge_max_concurrency)
        if fabric.is_global_zero:
            log.info(f"judge: {sr_cfg.judge_model} at {sr_cfg.judge_endpoint} (the policy does not judge)")
    trainer = SelfRewardingTrainer(
        policy, train, val, sampling, length, sr_cfg, run_context(fabric, exp, log_dir, checkpoints),
        max_seq_length=int(cfg.model.encoder_seq_length), judge=judge, judge_model=judge_model,
    )
    try:
        history = trainer.fit()
    finally:
        if judge is not None:
            judge.close()
    finish(fabric, checkpoints)
    return {"history": history, "val": trainer.last_val_metrics, "log_dir": str(log_dir), "trainer": trainer}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_self_rewarding", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)  # a user's mistake: one clear line, no traceback


if __name__ == "__main__":
    sys.exit(main())
