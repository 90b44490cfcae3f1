"""ResponseLogprobs gives the log-probabilities of the model's own forward (every logit transform included), for
every architecture family, in the plain, packed and DPO shared-prefix layouts."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from nemo_aligner.data.preference_batch import collate_preference_pairs
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.models.hf_causal_lm import ResponseLogprobs

VOCAB = 96
COMMON = dict(
    num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
#: model_type -> config overrides; the logit transforms are set far from identity so that skipping one shows.
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "mistral": {},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 1.5, "attn_logit_softcapping": 5.0},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 1.5},
    "gemma3": "nested",  # Gemma3ForConditionalGeneration: final_logit_softcapping under text_config
    "gpt2": "gpt2",
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 3.0},
    "cohere2": {"logit_scale": 3.0},
    "phi3": {},
    "phi": {},
    "starcoder2": {},
    "olmo2": {},
    "smollm3": {},
}


def tiny_lm(model_type: str):
    """A random 2-layer model of the family, with the LM head scaled so logits are O(5) (the transforms matter)."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type}")
    spec = FAMILIES[model_type]
    if spec == "gpt2":
        config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif spec == "nested":
        text = {**COMMON, "head_dim": 8, "final_logit_softcapping": 1.5}
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                      image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
                                      eoi_token_index=VOCAB - 3, pad_token_id=0)
        assert getattr(config, "final_logit_softcapping", None) is None  # only the nested one is set
    else:
        config = AutoConfig.for_model(model_type, **{**COMMON, **spec})
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        head = lm.get_output_embeddings()
        head.weight.mul_(1.0 / head.weight.std())  # unit-variance hidden states -> logits of std ~ sqrt(H) ~ 6
    return lm


def own_logprobs(lm, ids: list[int], targets_from: int) -> torch.Tensor:
    """log_softmax of the model's own ``forward(...).logits`` on one unpadded sequence, at the tokens from
    ``targets_from`` on."""
    x = torch.tensor([ids])
    logits = lm(input_ids=x, position_ids=torch.arange(len(ids))[None]).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[torch.arange(targets_from - 1, len(ids) - 1), x[0, targets_from:]]


def run(module, batch):
    return module(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col,
                  batch.targets)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_logprobs_equal_the_models_own_forward(model_type):
    lm = tiny_lm(model_type)
    module = ResponseLogprobs(lm)
    g = torch.Generator().manual_seed(1)
    examples = [
        {"input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist(), "prompt_length": p}
        for n, p in ((9, 4), (5, 2), (7, 3))
    ]
    expected = torch.cat([own_logprobs(lm, ex["input_ids"], ex["prompt_length"]) for ex in examples])
    pairs = [
        {"prompt_ids": ex["input_ids"][: ex["prompt_length"]], "chosen_ids": ex["input_ids"][ex["prompt_length"]:],
         "rejected_ids": ex["input_ids"][ex["prompt_length"]:][::-1]}
        for ex in examples
    ]
    with torch.no_grad():
        plain = run(module, collate_sequences(examples, 0))
        packed = run(module, collate_sequences(examples, 0, pack=True, max_row_length=24))
        # DPO shared-prefix rows [prompt | chosen | rejected]: check the chosen tokens
        dpo = collate_preference_pairs(pairs, pad_token_id=0, shared_prefix=True)
        assert dpo.attention_mask.dim() == 4
        pair_logprobs = run(module, dpo)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)
    rejected = [own_logprobs(lm, p["prompt_ids"] + p["rejected_ids"], len(p["prompt_ids"])) for p in pairs]
    chosen = [own_logprobs(lm, p["prompt_ids"] + p["chosen_ids"], len(p["prompt_ids"])) for p in pairs]
    torch.testing.assert_close(pair_logprobs.sort().values, torch.cat(chosen + rejected).sort().values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["granite", "cohere", "cohere2", "gemma2", "gemma3_text"])
def test_skipping_the_transform_would_be_far_off(model_type):
    """These families really transform their logits here (the test above could not pass by accident). The nested
    Gemma 3 (``Gemma3ForConditionalGeneration``) applies its ``text_config.final_logit_softcapping`` in some
    transformers versions and not in others; following its own forward is right in both."""
    lm = tiny_lm(model_type)
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = torch.log_softmax(lm(input_ids=ids).logits.float(), -1)
        hidden = lm.get_decoder()(input_ids=ids).last_hidden_state
        untransformed = torch.log_softmax(lm.get_output_embeddings()(hidden).float(), -1)
    assert (own - untransformed).abs().max() > 0.1


def test_lora_model_trains_through_the_response_positions_only():
    """A peft-wrapped Granite: same log-probs as its own forward, gradients flow, the head sees only N rows."""
    from peft import LoraConfig, get_peft_model

    lm = tiny_lm("granite")
    model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    module = ResponseLogprobs(model)
    ids = torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    batch = collate_sequences([{"input_ids": ids, "prompt_length": 6}], 0)
    rows = []
    handle = lm.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.shape))
    try:
        logprobs = run(module, batch)
    finally:
        handle.remove()
    assert rows == [torch.Size([1, 4, VOCAB])]  # logits only at the 4 positions predicting a response token
    with torch.no_grad():
        torch.testing.assert_close(logprobs.detach(), own_logprobs(model, ids, 6), atol=1e-5, rtol=0)
    logprobs.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_model_without_output_embeddings_hook_falls_back_to_full_logits(monkeypatch):
    lm = tiny_lm("cohere")
    monkeypatch.setattr(lm, "get_output_embeddings", lambda: None)
    ids = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    batch = collate_sequences([{"input_ids": ids, "prompt_length": 3}], 0)
    with torch.no_grad():
        torch.testing.assert_close(run(ResponseLogprobs(lm), batch), own_logprobs(lm, ids, 3), atol=1e-5, rtol=0)
