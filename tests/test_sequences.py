"""SequenceBatch layout: targets, last-token positions, and packed == unpacked log-probs on a tiny model."""

import pytest
import torch

from nemo_aligner.data.sequences import collate_sequences, per_sequence_sum, tokenize_prompt_response
from nemo_aligner.models.hf_causal_lm import ResponseLogprobs

from conftest import build_tiny_model


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
