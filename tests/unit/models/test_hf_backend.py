"""The shared transformers backend: one backbone forward for the three heads, the critic built on the reward model,
the RNG snapshot, and the small public members the entry scripts use instead of private ones."""

import io
import json
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.models.critic import HFCritic, TokenValues
from nemo_aligner.models.hf_backend import run_backbone
from nemo_aligner.models.hf_causal_lm import HFCausalLM
from nemo_aligner.models.reward_model import (
    MAX_SEQ_LENGTH_KEY,
    STANDARDIZATION_KEY,
    HFRewardModel,
    RewardScorer,
    ScalarHead,
)
from nemo_aligner.utils.config import ConfigValueError
from nemo_aligner.utils.runtime import build_fabric, rng_state, set_rng_state

from tests.helpers import build_tiny_model

CFG = OmegaConf.create({"optim": {"name": "adamw", "lr": 1e-3, "sched": {}}, "peft": {"peft_scheme": "none"}})


@pytest.fixture(scope="module")
def fabric():
    return build_fabric(OmegaConf.create({"accelerator": "cpu", "devices": 1}), seed=3)


def _sequences(tokenizer):
    ids = tokenizer("Human: tea? Assistant: yes the quick brown fox", add_special_tokens=False)["input_ids"] + [2]
    return [{"input_ids": ids, "prompt_length": 4}, {"input_ids": ids[:7], "prompt_length": 2}]


# ---- RNG snapshot ------------------------------------------------------------------------------------------------
def test_rng_state_restores_every_generator_exactly_and_loads_weights_only():
    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.standard_normal(3).tolist()

    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    state = rng_state()
    first = draws()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # what a checkpoint holds
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    set_rng_state(loaded)
    assert draws() == first
    set_rng_state(state)
    assert draws() == first
    assert isinstance(state["numpy"][1], list)  # plain values, hence weights_only
    assert state["cuda"] is None or torch.cuda.is_available()


# ---- one backbone forward ----------------------------------------------------------------------------------------
def test_run_backbone_is_the_models_forward_with_the_mask_made_ready(tokenizer):
    lm = build_tiny_model("llama", len(tokenizer)).eval()
    batch = collate_sequences(_sequences(tokenizer), 0, pack=True, max_row_length=32)  # one row, 4-D bool mask
    assert batch.attention_mask.dim() == 4
    with torch.no_grad():
        sdpa = run_backbone(lm, batch.input_ids, batch.position_ids, batch.attention_mask).logits
        lm.config._attn_implementation = "eager"  # the bool mask becomes an additive float mask
        eager = run_backbone(lm, batch.input_ids, batch.position_ids, batch.attention_mask).logits
        # the packed row gives each sequence what it gets alone
        for k, example in enumerate(_sequences(tokenizer)):
            alone = lm(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            row, end = int(batch.last_row[k]), int(batch.last_col[k]) + 1
            assert torch.allclose(eager[row, end - len(alone) : end], alone, atol=1e-5)
    assert torch.allclose(sdpa, eager, atol=1e-5)
    lm.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigValueError, match="set pack=false"):
        run_backbone(lm, batch.input_ids, batch.position_ids, batch.attention_mask, "pack=false")


# ---- the critic is the reward model read at every response token -------------------------------------------------
def test_the_critic_is_the_reward_model_read_at_every_response_token(tmp_path, fabric, tiny_model_dir, tokenizer):
    rm = HFRewardModel(fabric, CFG, str(tiny_model_dir), max_steps=1, max_seq_length=64)
    rm.set_standardization(0.5, 2.0)
    rm.export_hf(str(tmp_path / "rm"))
    critic = HFCritic(fabric, CFG, str(tmp_path / "rm"), max_steps=1)
    assert isinstance(critic, HFRewardModel) and TokenValues is ScalarHead
    assert (critic.reward_mean, critic.reward_std) == (0.5, 2.0)

    examples = _sequences(tokenizer)
    batch = collate_sequences(examples, 0)
    with torch.no_grad():
        raw = rm.get_rewards(batch)
        assert torch.equal(critic.get_rewards(batch), (raw - 0.5) / 2.0)  # same weights, same head, same bits
        values = critic.get_values(batch)
        # V at the position predicting token c is the standardised reward of the prefix that ends there (causal)
        for n, (row, col) in enumerate(zip(batch.pred_row.tolist(), batch.pred_col.tolist())):
            prefix = collate_sequences([{"input_ids": examples[row]["input_ids"][: col + 1]}], 0)
            assert float(values[n]) == pytest.approx(float(critic.get_rewards(prefix)[0]), abs=1e-5)

    critic.export_hf(str(tmp_path / "critic"))
    rm_config = json.loads((tmp_path / "rm" / "config.json").read_text())
    critic_config = json.loads((tmp_path / "critic" / "config.json").read_text())
    assert rm_config[STANDARDIZATION_KEY] == critic_config[STANDARDIZATION_KEY] == {"mean": 0.5, "std": 2.0}
    # the critic writes no serving entries of its own (it has no max_seq_length; the reward model's export would write
    # null): the one in its config is the one it was loaded with
    assert critic.max_seq_length is None and rm_config[MAX_SEQ_LENGTH_KEY] == critic_config[MAX_SEQ_LENGTH_KEY] == 64


def test_as_scorer_scores_like_the_export(tmp_path, fabric, tiny_model_dir, tokenizer):
    rm = HFRewardModel(fabric, CFG, str(tiny_model_dir), max_steps=1, max_seq_length=48)
    rm.set_standardization(-0.25, 3.0)
    rm.export_hf(str(tmp_path / "rm"))
    exported = RewardScorer.from_pretrained(str(tmp_path / "rm"))
    scorer = rm.as_scorer()
    seqs = [e["input_ids"] for e in _sequences(tokenizer)]
    assert scorer.score(seqs) == exported.score(seqs)
    assert (scorer.max_seq_length, scorer.mean, scorer.std) == (exported.max_seq_length, -0.25, 3.0) == (48, -0.25, 3.0)
    assert scorer.vocab_size == exported.vocab_size == len(tokenizer)
    assert scorer.name == str(tiny_model_dir) and exported.name == str(tmp_path / "rm")
    assert not any(p.requires_grad for p in scorer.model.parameters())  # shared weights, frozen


def test_freeze_leaves_generation_as_it_was(fabric, tiny_model_dir):
    from nemo_aligner.generation import LengthParams, SamplingParams

    policy = HFCausalLM(fabric, CFG, str(tiny_model_dir), max_steps=1, need_reference=False)
    args = ([[1, 5, 9], [1, 7]], SamplingParams(temperature=1.0, top_k=0, top_p=0.9), LengthParams(max_length=5))
    before = policy.generate(*args, seeds=[11, 12])
    policy.freeze()
    assert not any(p.requires_grad for p in policy.module.parameters())
    assert policy.generate(*args, seeds=[11, 12]) == before
