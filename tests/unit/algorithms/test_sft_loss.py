"""The SFT loss: the token-mean negative log-likelihood against hand computation, on a tiny model, packed or padded."""

import math

import pytest
import torch

from nemo_aligner.algorithms.supervised import sft_loss_and_metrics
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.models.hf_causal_lm import ResponseLogprobs

from tests.helpers import build_tiny_model
from tests.helpers import encode_sft_record as encode


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------


def test_loss_is_the_token_mean_nll_closed_form():
    batch = collate_sequences(
        [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [0, 1]}], pad_token_id=0
    )
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.125]))  # targets 6, 7 | 9
    loss, metrics = sft_loss_and_metrics(logprobs, batch)
    assert loss.item() == pytest.approx((1 + 2 + 3) * math.log(2) / 3)  # token mean, not a mean of sequence means
    assert metrics["loss"].item() == pytest.approx(2 * math.log(2))
    assert metrics["target_tokens"].item() == 3 and metrics["num_sequences"].item() == 2
    assert metrics["target_fraction"].item() == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="one per target token"):
        sft_loss_and_metrics(logprobs[:2], batch)


def _examples(tokenizer):
    records = [
        {"messages": [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"},
                      {"role": "user", "content": "bread?"}, {"role": "assistant", "content": "Mix flour and bake."}]},
        {"input": "Tell me something rude.", "output": " I would rather not."},
        {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog"},
    ]
    return [dict(zip(("input_ids", "loss_mask"), encode(tokenizer, r)), index=i) for i, r in enumerate(records)]


def test_model_loss_matches_a_hand_computed_nll(tokenizer):
    lm = build_tiny_model("llama", len(tokenizer), seed=3).eval()
    examples = _examples(tokenizer)
    batch = collate_sequences(examples, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        loss, metrics = sft_loss_and_metrics(ResponseLogprobs(lm)(
            batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col, batch.targets
        ), batch)
        total, count = 0.0, 0
        for ex in examples:  # one sequence at a time, full-vocabulary softmax, sum over masked next tokens
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(lm(ids).logits[0].double(), dim=-1)
            for t in range(1, len(ex["input_ids"])):
                if ex["loss_mask"][t]:
                    total -= logp[t - 1, ex["input_ids"][t]].item()
                    count += 1
    assert metrics["target_tokens"].item() == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_packing_gives_the_same_loss_as_padding(tokenizer):
    lm = build_tiny_model("llama", len(tokenizer), seed=4).eval()
    examples = _examples(tokenizer)
    head = ResponseLogprobs(lm)
    losses = []
    for pack in (False, True):
        capacity = sum(len(ex["input_ids"]) for ex in examples)
        batch = collate_sequences(examples, tokenizer.pad_token_id, pack=pack, max_row_length=capacity)
        assert batch.input_ids.shape[0] == (1 if pack else 3)
        with torch.no_grad():
            logprobs = head(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col,
                            batch.targets)
        losses.append(sft_loss_and_metrics(logprobs, batch)[0].item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
