"""Tiny causal LMs with random weights, built from a config (no download)."""

from __future__ import annotations

import torch


def build_tiny_model(kind: str, vocab_size: int, seed: int = 0):
    """A 2-layer, hidden-64 causal LM of the given family with random weights (dropout off); ``llama-hd64`` is a
    2-layer Llama with hidden size 128 and 2 heads of ``head_dim`` 64, the smallest head vLLM's CPU backend runs."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=vocab_size, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    if kind == "llama-hd64":
        cfg = LlamaConfig(
            num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
            head_dim=64, vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def save_tiny_reward_model(path, model_dir, tokenizer, seed: int = 7):
    """Save a tiny reward-model export at ``path``: the tiny model of ``model_dir`` as
    ``AutoModelForSequenceClassification(num_labels=1)`` (its head drawn with ``seed``), with the tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
