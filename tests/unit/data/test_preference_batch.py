"""The shared-prefix layout gives exactly the log-probs of separate prompt+response forwards."""

import pytest
import torch

from nemo_aligner.data.preference_batch import collate_preference_pairs
from nemo_aligner.models.hf_causal_lm import ResponseLogprobs

from tests.helpers import build_tiny_model

PAIRS = [
    {"prompt_ids": [1, 20, 21, 22], "chosen_ids": [30, 31, 2], "rejected_ids": [40, 2]},
    {"prompt_ids": [1, 23], "chosen_ids": [32, 2], "rejected_ids": [41, 42, 43, 44, 2]},
    {"prompt_ids": [1, 24, 25, 26, 27, 28], "chosen_ids": [33, 2], "rejected_ids": [45, 2]},
]


def naive_logprobs(lm, prompt, response):
    """Sum of log p(response | prompt) from one plain forward over prompt + response."""
    ids = torch.tensor([prompt + response])
    logits = lm(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).sum().item()


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_layouts_match_separate_forwards(kind, attn, shared_prefix):
    lm = build_tiny_model(kind, vocab_size=64).eval()
    lm.config._attn_implementation = attn
    module = ResponseLogprobs(lm)
    batch = collate_preference_pairs(PAIRS, pad_token_id=0, shared_prefix=shared_prefix)
    with torch.no_grad():
        tokens = module(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col, batch.targets)
    sums = torch.zeros(2 * len(PAIRS)).index_add(0, batch.seq_id, tokens)
    for k, pair in enumerate(PAIRS):
        with torch.no_grad():
            chosen = naive_logprobs(lm, pair["prompt_ids"], pair["chosen_ids"])
            rejected = naive_logprobs(lm, pair["prompt_ids"], pair["rejected_ids"])
        assert sums[k].item() == pytest.approx(chosen, abs=1e-4)
        assert sums[len(PAIRS) + k].item() == pytest.approx(rejected, abs=1e-4)


def test_shared_prefix_layout_shape_and_token_count():
    batch = collate_preference_pairs(PAIRS, pad_token_id=0, shared_prefix=True)
    assert batch.input_ids.shape == (3, 10)  # longest row: pair 2 = 6 + 2 + 2
    assert batch.attention_mask.shape == (3, 1, 10, 10)
    # logical tokens as two separate sequences: sum(2P + C + R)
    assert batch.num_tokens == sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in PAIRS)
    # the rejected response of pair 0 starts at position 4 again and cannot see the chosen response
    row = batch.attention_mask[0, 0]
    assert batch.position_ids[0, 7].item() == 4
    assert not row[7, 4:7].any() and row[7, :4].all()
    unshared = collate_preference_pairs(PAIRS, pad_token_id=0, shared_prefix=False)
    assert unshared.input_ids.shape == (6, 8) and unshared.attention_mask.shape == (6, 8)


def test_collate_rejects_empty_parts():
    with pytest.raises(ValueError, match="empty"):
        collate_preference_pairs([{"prompt_ids": [], "chosen_ids": [3], "rejected_ids": [4]}], pad_token_id=0)
