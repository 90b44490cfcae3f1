"""Shared fixtures: a tiny tokenizer and tiny causal LMs built offline from a config (random weights)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "hh-rlhf"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, then bake.",
    "Human: What is two plus two? Assistant: Two plus two is four.",
    "Human: Tell me something rude. Assistant: I would rather not be rude.",
    "the quick brown fox jumps over the lazy dog 0123456789",
]


def build_tokenizer():
    """Byte-level BPE tokenizer (vocab ~300) with <s>, </s>, <pad> and a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


def build_tiny_model(kind: str, vocab_size: int, seed: int = 0):
    """A 2-layer, hidden-64 causal LM of the given family with random weights (dropout off)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=vocab_size, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models run fastest on one intra-op thread (thread start-up costs more than the matmuls), and CI has
    two cores shared by the test process and the servers it starts. Tests marked ``slow`` (real SmolLM2) keep
    torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Directory with a saved tiny Llama and the tiny tokenizer (loadable by from_pretrained)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    build_tiny_model("gpt2", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_example_script(name: str):
    """Import ``examples/nlp/gpt/<name>.py`` as a module (for in-process end-to-end tests)."""
    path = REPO / "examples" / "nlp" / "gpt" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2_rm_export(tmp_path_factory) -> Path:
    """A SmolLM2-135M-Instruct reward-model export: the RM quick start's ``results/rm_quickstart/hf_export`` when it
    exists, else one trained here (2 steps of 2 HH-RLHF pairs, 128 tokens; ~1 min on CPU) so the slow tests never
    skip on a fresh machine. Skips only when the HH-RLHF data is missing."""
    import subprocess

    export = REPO / "results" / "rm_quickstart" / "hf_export"
    if (export / "config.json").is_file():
        return export
    if not (SHARED_DATA / "train.jsonl.gz").is_file():
        pytest.skip(f"no HH-RLHF data at {SHARED_DATA}")
    log_dir = tmp_path_factory.mktemp("smollm2_rm")
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "nlp" / "gpt" / "train_reward_model.py"),
         "pretrained_checkpoint.restore_from_path=smollm2-135m-instruct",
         f"model.data.data_prefix.train=[{SHARED_DATA / 'train.jsonl.gz'}]", "model.data.data_prefix.validation=null",
         f"model.data.cache_dir={log_dir / 'cache'}", f"exp_manager.explicit_log_dir={log_dir}",
         "trainer.accelerator=cpu", "trainer.rm.max_steps=2", "trainer.rm.val_check_interval=0",
         "trainer.rm.save_interval=0", "model.global_batch_size=2", "model.micro_batch_size=2",
         "model.encoder_seq_length=128", "model.data.truncation=drop"],
        check=True, capture_output=True, text=True,
    )
    export = log_dir / "hf_export"
    assert (export / "config.json").is_file()
    return export
