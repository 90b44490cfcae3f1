"""SequenceBatch layout: targets, last-token positions, and packed == unpacked log-probs on a tiny model."""

import pytest
import torch

from nemo_aligner.data.chat import tokenize_prompt_response
from nemo_aligner.data.sequences import collate_sequences, per_sequence_sum
from nemo_aligner.models.hf_causal_lm import ResponseLogprobs

from tests.helpers import build_tiny_model


def test_targets_and_last_positions():
    examples = [
        {"input_ids": [5, 6, 7, 8], "prompt_length": 2, "index": 3},
        {"input_ids": [9, 10, 11], "loss_mask": [0, 1, 0]},
    ]
    batch = collate_sequences(examples, pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # sequence 0 targets tokens 7, 8 (predicted from columns 1, 2); sequence 1 targets token 10 (from column 0)
    assert batch.targets.tolist() == [7, 8, 10]
    assert batch.pred_row.tolist() == [0, 0, 1]
    assert batch.pred_col.tolist() == [1, 2, 0]
    assert batch.seq_id.tolist() == [0, 0, 1]
    assert batch.last_row.tolist() == [0, 1] and batch.last_col.tolist() == [3, 2]
    assert batch.target_lengths.tolist() == [2, 1] and batch.seq_lengths.tolist() == [4, 3]
    assert batch.sample_index.tolist() == [3, -1] and batch.num_tokens == 7


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        collate_sequences([], 0)
    with pytest.raises(ValueError, match="empty"):
        collate_sequences([{"input_ids": []}], 0)
    with pytest.raises(ValueError, match="loss_mask has 2 entries for 3 tokens"):
        collate_sequences([{"input_ids": [1, 2, 3], "loss_mask": [0, 1]}], 0)
    with pytest.raises(ValueError, match="does not fit"):
        collate_sequences([{"input_ids": [1, 2, 3]}], 0, pack=True, max_row_length=2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_logprobs_equal_unpacked(kind):
    torch.manual_seed(0)
    lm = build_tiny_model(kind, 64).eval()
    module = ResponseLogprobs(lm)
    examples = [
        {"input_ids": torch.randint(3, 64, (n,)).tolist(), "prompt_length": p} for n, p in ((9, 4), (5, 2), (3, 1), (7, 3))
    ]
    plain = collate_sequences(examples, 0)
    packed = collate_sequences(examples, 0, pack=True, max_row_length=12)
    assert packed.input_ids.shape[0] < len(examples)
    with torch.no_grad():
        a = module(plain.input_ids, plain.position_ids, plain.attention_mask, plain.pred_row, plain.pred_col, plain.targets)
        b = module(packed.input_ids, packed.position_ids, packed.attention_mask, packed.pred_row, packed.pred_col, packed.targets)
    assert plain.seq_id.tolist() == packed.seq_id.tolist() and plain.targets.tolist() == packed.targets.tolist()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    sums = per_sequence_sum(a, plain.seq_id, 4)
    assert sums.shape == (4,) and torch.isclose(sums[1], a[plain.seq_id == 1].sum())
    # each sequence's last token sits where the layout says
    for k, ex in enumerate(examples):
        assert packed.input_ids[packed.last_row[k], packed.last_col[k]] == ex["input_ids"][-1]


def test_tokenize_prompt_response_matches_preference_rules(tokenizer):
    prompt_ids, response_ids = tokenize_prompt_response("Human: hi", " there", tokenizer)
    assert tokenizer.decode(prompt_ids) == "Human: hi" and response_ids[-1] == tokenizer.eos_token_id
    chat_prompt, chat_response = tokenize_prompt_response([{"role": "user", "content": "hi"}], "yo", tokenizer)
    assert tokenizer.decode(chat_prompt + chat_response) == "<|user|>hi</s><|assistant|>yo</s>"


def test_shared_prefix_attention_mask_by_hand():
    """Row ``[p p a a b pad]``: ``a`` and ``b`` see the prompt and themselves, never each other; pad sees itself."""
    from nemo_aligner.data.sequences import shared_prefix_attention_mask

    block = torch.tensor([[0, 0, 0, 0, 0, -1]])
    segment = torch.tensor([[0, 0, 1, 1, 2, 0]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(shared_prefix_attention_mask(block, segment)[0, 0], expected)


# ---- sliding-window models and the 4-D masks --------------------------------------------------------------------
WINDOW = 8


def _windowed_lm(model_type: str, attn: str = "sdpa"):
    """A random 2-layer model whose attention sees only the last ``WINDOW`` tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"mistral": {}, "qwen2": {"use_sliding_window": True, "max_window_layers": 0},
             "gemma2": {"head_dim": 8}, "starcoder2": {}}[model_type]
    config = AutoConfig.for_model(
        model_type, num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, sliding_window=WINDOW, pad_token_id=0,
        attn_implementation=attn, **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _logprobs(module, batch):
    with torch.no_grad():
        return module(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col,
                      batch.targets)


@pytest.mark.parametrize("model_type,attn", [("mistral", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager"), ("starcoder2", "sdpa")])
def test_sliding_window_model_within_its_window_packs_exactly(model_type, attn):
    """Sequences of at most ``WINDOW`` tokens: packed and DPO shared-prefix log-probs equal the unpacked ones."""
    from nemo_aligner.data.preference_batch import collate_preference_pairs

    module = ResponseLogprobs(_windowed_lm(model_type, attn))
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(3, 64, (n,), generator=g).tolist(), "prompt_length": p}
                for n, p in ((8, 3), (5, 2), (7, 4))]
    plain = _logprobs(module, collate_sequences(examples, 0))
    torch.testing.assert_close(_logprobs(module, collate_sequences(examples, 0, pack=True, max_row_length=24)), plain,
                               atol=1e-5, rtol=0)
    # [prompt | chosen | rejected] in one row: 12 columns, but each sequence is only 8 tokens (positions restart)
    pairs = [{"prompt_ids": examples[0]["input_ids"][:3], "chosen_ids": examples[0]["input_ids"][3:],
              "rejected_ids": examples[0]["input_ids"][3:][::-1]}]
    shared = collate_preference_pairs(pairs, 0, shared_prefix=True)
    separate = collate_preference_pairs(pairs, 0, shared_prefix=False)
    assert shared.attention_mask.dim() == 4 and shared.input_ids.shape[1] > WINDOW
    torch.testing.assert_close(_logprobs(module, shared).sort().values, _logprobs(module, separate).sort().values,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type,attn", [("mistral", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager")])
def test_sliding_window_model_refuses_a_packed_sequence_longer_than_its_window(model_type, attn):
    from nemo_aligner.models.hf_causal_lm import prepare_attention_mask

    lm = _windowed_lm(model_type, attn)
    module = ResponseLogprobs(lm)
    examples = [{"input_ids": torch.randint(3, 64, (12,), generator=torch.Generator().manual_seed(1)).tolist(),
                 "prompt_length": 2}]
    plain = collate_sequences(examples, 0)
    packed = collate_sequences(examples, 0, pack=True)
    windowed = _logprobs(module, plain)  # 2-D padding mask: transformers applies the window itself
    full_causal = plain.attention_mask[:, None, :, None].bool() & torch.ones(12, 12, dtype=torch.bool).tril()
    unwindowed = ResponseLogprobs(_windowed_lm(model_type, attn))
    unwindowed.lm.config.sliding_window = None  # what the 4-D mask would silently compute
    if hasattr(unwindowed.lm.config, "layer_types"):
        unwindowed.lm.config.layer_types = ["full_attention"] * 2
    with torch.no_grad():
        ignored = unwindowed(plain.input_ids, plain.position_ids, full_causal, plain.pred_row, plain.pred_col,
                             plain.targets)
    assert (windowed - ignored).abs().max() > 1e-3  # the window matters for this sequence
    message = r"attends only the last 8 tokens.*sequence of 12 tokens.*model\.dpo\.shared_prefix=false"
    with pytest.raises(ValueError, match=message):
        _logprobs(module, packed)
    for prepare in (lambda m: prepare_attention_mask(m, lm.config),):  # the critic and RM call this one function
        with pytest.raises(ValueError, match=message):
            prepare(packed.attention_mask)
        assert torch.equal(prepare(plain.attention_mask), plain.attention_mask)  # 2-D masks pass


def test_attention_window_reads_the_config():
    from transformers import AutoConfig

    from nemo_aligner.data.sequences import attention_window

    small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64)
    assert attention_window(AutoConfig.for_model("llama", **small)) is None
    assert attention_window(AutoConfig.for_model("mistral", sliding_window=16, **small)) == 16
    assert attention_window(AutoConfig.for_model("mistral", sliding_window=None, **small)) is None
    assert attention_window(AutoConfig.for_model("qwen2", sliding_window=16, use_sliding_window=False, **small)) is None
    assert attention_window(AutoConfig.for_model("gemma2", sliding_window=16, **small)) == 16
    nested = AutoConfig.for_model("gemma3", text_config={**small, "sliding_window": 16})
    assert attention_window(nested) == 16
