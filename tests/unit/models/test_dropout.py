"""Dropout is off in the trained models (policy, critic, reward model), as TRL does: the algorithms compare
train-mode outputs with eval-mode ones, so with dropout the first PPO ratio would not be 1."""

import pytest
import torch
from lightning.fabric import Fabric
from omegaconf import OmegaConf

from nemo_aligner.models.hf_causal_lm import disable_dropout

OPTIM = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.98], "sched": {}}


@pytest.fixture(scope="module")
def dropout_gpt2_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=512, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1, summary_first_dropout=0.1, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    path = tmp_path_factory.mktemp("dropout_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rollouts(tokenizer):
    from nemo_aligner.data.rollouts import Rollouts

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = (("Human: tea? Assistant:", " yes please"), ("Human: rain? Assistant:", " wet and cold"))
    return Rollouts.from_lists([[1] + ids(p) for p, _ in pairs], [ids(r) + [2] for _, r in pairs])


@pytest.mark.parametrize("scheme", ["none", "lora"])
def test_first_ppo_ratio_is_one_with_a_dropout_model(dropout_gpt2_dir, tokenizer, scheme):
    """PPO's old log-probs (``policy_logprobs``, eval mode) against the train-mode log-probs of the first actor
    update (``PPOTrainer.train_actor``'s calls): the ratio is exactly 1 before any update."""
    from nemo_aligner.algorithms.ppo import policy_logprobs
    from nemo_aligner.models.hf_causal_lm import HFCausalLM
    from nemo_aligner.algorithms.ppo_math import ppo_policy_loss

    torch.manual_seed(0)
    cfg = OmegaConf.create({"optim": OPTIM, "peft": {"peft_scheme": scheme, "lora_tuning": {
        "target_modules": ["attention_qkv"], "adapter_dim": 4, "alpha": 8, "adapter_dropout": 0.1}}})
    actor = HFCausalLM(Fabric(accelerator="cpu", devices=1), cfg, str(dropout_gpt2_dir), max_steps=1)
    rollouts = _rollouts(tokenizer)
    old = policy_logprobs(actor, rollouts, 2)
    actor.prepare_for_training_step()
    logprobs = actor.get_logprobs(rollouts.sequence_batch(actor.pad_token_id))
    _, metrics = ppo_policy_loss(logprobs, old, torch.ones_like(old), 0.2)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(logprobs.detach(), old, atol=1e-6, rtol=0)
    if scheme == "lora":  # the user's explicit adapter_dropout is kept
        assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for n, m in actor._lm.named_modules() if "lora_dropout" in n)


def test_critic_and_reward_model_train_without_dropout(dropout_gpt2_dir, tokenizer):
    """As TRL (RewardTrainer and PPOTrainer's value model, ``disable_dropout=True``): train mode == eval mode."""
    from nemo_aligner.models.critic import HFCritic
    from nemo_aligner.models.reward_model import HFRewardModel

    fabric = Fabric(accelerator="cpu", devices=1)
    cfg = OmegaConf.create({"optim": OPTIM})
    batch = _rollouts(tokenizer).sequence_batch(0)
    for model, read in ((HFCritic(fabric, cfg, str(dropout_gpt2_dir), max_steps=1), "get_values"),
                        (HFRewardModel(fabric, cfg, str(dropout_gpt2_dir), max_steps=1), "get_rewards")):
        model.prepare_for_training_step()
        with torch.no_grad():
            train = getattr(model, read)(batch)
        with model.inference():
            evaluated = getattr(model, read)(batch)
        torch.testing.assert_close(train, evaluated, atol=1e-6, rtol=0)


def test_disable_dropout_covers_modules_functional_attributes_and_configs():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                  num_attention_heads=4, vocab_size=64, attention_dropout=0.3)
    lm = AutoModelForCausalLM.from_config(config)
    assert lm.model.layers[0].self_attn.attention_dropout == 0.3  # read as a float in forward, not an nn.Dropout
    disable_dropout(lm)
    assert lm.model.layers[0].self_attn.attention_dropout == 0.0 and lm.config.attention_dropout == 0.0
    lm.train()
    ids = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(lm(ids).logits, lm.eval()(ids).logits)

    nested = AutoConfig.for_model("gemma3", text_config={"num_hidden_layers": 1, "attention_dropout": 0.2},
                                  vision_config={"num_hidden_layers": 1, "attention_dropout": 0.2})
    holder = torch.nn.Module()
    holder.config = nested
    disable_dropout(holder)
    assert nested.text_config.attention_dropout == 0.0 and nested.vision_config.attention_dropout == 0.0
