"""Generation engine: exactness against a no-cache reference loop, batching, sampling, stopping rules, seeds."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.fabric import Fabric
from omegaconf import OmegaConf

from tests.helpers import build_tiny_model
from nemo_aligner.generation import GenerationOutput, LengthParams, SamplingParams, generate
from nemo_aligner.generation.sampling import choose_tokens, splitmix64

GREEDY = SamplingParams(use_greedy=True)
TEXTS = ["Human: How do I bake bread? Assistant:", "the quick brown fox", "Human: What is two plus two?", "0"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tokenizer):
    return build_tiny_model(request.param, len(tokenizer), seed=3).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def reference_loop(lm, prompt, max_new, eos=(), penalty=1.0, min_length=0):
    """Hand-rolled greedy decoding: full forward over the whole sequence every step, no cache, no batching."""
    ids, response = list(prompt), []
    for step in range(max_new):
        with torch.no_grad():
            logits = lm(torch.tensor([ids])).logits[0, -1].float()
        if penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[torch.tensor(ids)] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if step < min_length:
            logits[list(eos)] = float("-inf")
        token = int(logits.argmax())
        response.append(token)
        ids.append(token)
        if token in eos:
            break
    return response


def test_greedy_matches_reference_loop_token_for_token(lm, prompts):
    out = generate(lm, prompts, GREEDY, LengthParams(max_length=12), eos_token_ids=[2], pad_token_id=0)
    assert isinstance(out, GenerationOutput)
    for prompt, response, ended in zip(prompts, out.response_ids, out.ended):
        expected = reference_loop(lm, prompt, 12, eos=(2,))
        assert response == expected
        assert ended == (expected[-1] == 2)


def test_repetition_penalty_and_min_length_match_reference(lm, prompts):
    first = generate(lm, prompts[:1], GREEDY, LengthParams(max_length=6), [2], 0).response_ids[0]
    eos = [first[0], first[1]]  # tokens greedy wants early: banned by min_length
    out = generate(
        lm, prompts, SamplingParams(use_greedy=True, repetition_penalty=1.5), LengthParams(12, min_length=4), eos, 0
    )
    for prompt, response in zip(prompts, out.response_ids):
        assert response == reference_loop(lm, prompt, 12, eos=eos, penalty=1.5, min_length=4)
        assert not set(response[:4]) & set(eos)


def test_batched_equals_one_at_a_time_with_early_stops(lm, prompts):
    lengths = LengthParams(max_length=10)
    alone = [generate(lm, [p], GREEDY, lengths, [2], 0).response_ids[0] for p in prompts]
    eos = [alone[0][0], alone[2][3]]  # prompt 0 stops after one token, prompt 2 after four: rows are dropped
    alone = [generate(lm, [p], GREEDY, lengths, eos, 0) for p in prompts]
    batched = generate(lm, prompts, GREEDY, lengths, eos, 0)
    assert batched.response_ids == [a.response_ids[0] for a in alone]
    assert batched.ended == [a.ended[0] for a in alone]
    assert batched.response_ids[0] == [eos[0]] and batched.ended[0]
    assert len(batched.response_ids[2]) <= 4 and batched.ended[2]

    sampling = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1)
    seeds = [11, 22, 33, 44]
    batched = generate(lm, prompts, sampling, lengths, eos, 0, seeds=seeds)
    for i in range(len(prompts)):
        assert generate(lm, [prompts[i]], sampling, lengths, eos, 0, seeds=[seeds[i]]).response_ids[0] == batched.response_ids[i]


def test_top_k_one_and_tiny_top_p_equal_greedy(lm, prompts):
    greedy = generate(lm, prompts, GREEDY, LengthParams(10), [2], 0).response_ids
    for params in (SamplingParams(temperature=0.7, top_k=1), SamplingParams(temperature=1.3, top_p=1e-6)):
        assert generate(lm, prompts, params, LengthParams(10), [2], 0, generator=torch.Generator().manual_seed(5)).response_ids == greedy


def test_max_length_eos_and_seed_reproducibility(lm, prompts):
    sampling = SamplingParams(temperature=1.0)
    out = generate(lm, prompts, sampling, LengthParams(7), [], 0, generator=torch.Generator().manual_seed(1))
    assert [len(r) for r in out.response_ids] == [7] * 4 and out.ended == [False] * 4
    again = generate(lm, prompts, sampling, LengthParams(7), [], 0, generator=torch.Generator().manual_seed(1))
    other = generate(lm, prompts, sampling, LengthParams(7), [], 0, generator=torch.Generator().manual_seed(2))
    assert again.response_ids == out.response_ids
    assert other.response_ids != out.response_ids
    assert generate(lm, prompts, sampling, LengthParams(0), [], 0).response_ids == [[]] * 4
    # EOS ends a response and is kept as its last token
    eos = out.response_ids[0][2]
    stopped = generate(lm, prompts[:1], sampling, LengthParams(7), [eos], 0, generator=torch.Generator().manual_seed(1))
    cut = out.response_ids[0].index(eos) + 1
    assert stopped.response_ids[0] == out.response_ids[0][:cut] and stopped.ended == [True]


def test_end_strings(lm, prompts, tokenizer):
    full = generate(lm, prompts[:1], GREEDY, LengthParams(16), [], 0).response_ids[0]
    end = tokenizer.decode(full[:5])[-2:]
    assert end.strip(), "pick a visible end string"
    expected_len = next(n for n in range(1, 17) if tokenizer.decode(full[:n]).endswith(end))
    params = SamplingParams(use_greedy=True, end_strings=["<never>", end])
    out = generate(lm, prompts[:1], params, LengthParams(16), [], 0, tokenizer=tokenizer)
    assert out.response_ids[0] == full[:expected_len] and out.ended == [True]
    late = generate(lm, prompts[:1], params, LengthParams(16, min_length=expected_len + 1), [], 0, tokenizer=tokenizer)
    assert late.response_ids[0][:expected_len + 1] == full[:expected_len + 1]  # the early match was ignored
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(lm, prompts[:1], params, LengthParams(4), [], 0)


def test_sampling_distribution_follows_temperature_top_k_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    n = 40000
    keys = splitmix64(torch.arange(n))
    for params in (SamplingParams(temperature=0.7), SamplingParams(top_k=4), SamplingParams(top_p=0.8, temperature=1.5)):
        scaled = logits[0] / params.temperature
        probs = scaled.softmax(-1)
        order = probs.argsort(descending=True)
        keep = torch.zeros(12, dtype=torch.bool)
        if params.top_k:
            keep[order[: params.top_k]] = True
        else:
            before = probs[order].cumsum(0) - probs[order]
            keep[order[before < params.top_p]] = True
        expected = torch.where(keep, probs, torch.zeros(())) / probs[keep].sum()
        counts = torch.bincount(choose_tokens(logits.expand(n, 12), params, keys), minlength=12) / n
        assert torch.allclose(counts, expected, atol=0.012), (params, counts, expected)


def test_errors_and_params():
    lm = build_tiny_model("gpt2", 50)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(lm, [[1], []], GREEDY, LengthParams(2), [2], 0)
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        generate(lm, [[1] * 500], GREEDY, LengthParams(20), [2], 0)
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        generate(lm, [[1], [3]], SamplingParams(), LengthParams(2), [2], 0, seeds=[1])
    for bad in (dict(temperature=0), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0)):
        with pytest.raises(ValueError, match="sampling_params"):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="min_length=5 exceeds max_length=4"):
        LengthParams(4, 5)
    cfg = OmegaConf.create({"use_greedy": False, "temperature": 0.5, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.0,
                            "add_BOS": False, "all_probs": False, "compute_logprob": False, "end_strings": ["<|endoftext|>"]})
    params = SamplingParams.from_cfg(cfg)
    assert (params.temperature, params.top_p, params.end_strings) == (0.5, 0.9, ["<|endoftext|>"])
    assert LengthParams.from_cfg({"max_length": 9, "min_length": 2}) == LengthParams(9, 2)
    assert SamplingParams.from_cfg(None) == SamplingParams()
    with pytest.raises(ValueError, match="unknown key 'topk'"):
        SamplingParams.from_cfg({"topk": 3})


def _policy(model_dir, peft="none"):
    from nemo_aligner.models.hf_causal_lm import HFCausalLM

    cfg = OmegaConf.create({
        "optim": {"name": "adamw", "lr": 3e-2, "weight_decay": 0.0, "betas": [0.9, 0.98], "sched": {}},
        "peft": {"peft_scheme": peft, "lora_tuning": {"target_modules": ["all"], "adapter_dim": 4, "alpha": 8}},
    })
    return HFCausalLM(Fabric(accelerator="cpu", devices=1), cfg, str(model_dir), max_steps=10, need_reference=False)


def test_hf_causal_lm_generate_round_trip(tiny_model_dir, tokenizer, prompts):
    from transformers import AutoModelForCausalLM

    policy = _policy(tiny_model_dir)
    policy.module.train()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = generate(base, prompts, GREEDY, LengthParams(8), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    out = policy.generate(prompts, GREEDY, LengthParams(8))
    assert out == expected
    assert policy.module.training and policy._lm.training  # train mode restored
    sampling = SamplingParams(top_p=0.9)
    assert policy.generate(prompts, sampling, LengthParams(8), seed=4) == policy.generate(prompts, sampling, LengthParams(8), seed=4)
    per_row = policy.generate(prompts, sampling, LengthParams(8), seeds=[1, 2, 3, 4])
    assert policy.generate(prompts[1:2], sampling, LengthParams(8), seeds=[2]).response_ids[0] == per_row.response_ids[1]


def test_hf_causal_lm_generate_uses_lora_adapters(tiny_model_dir, tokenizer, prompts):
    policy = _policy(tiny_model_dir, peft="lora")
    with torch.no_grad():  # make the adapters matter: non-zero B matrices
        for name, param in policy._lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    merged = copy.deepcopy(policy._lm).merge_and_unload().eval()
    out = policy.generate(prompts, GREEDY, LengthParams(8))
    assert out == generate(merged, prompts, GREEDY, LengthParams(8), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    with policy._lm.disable_adapter():
        without = generate(policy._lm.eval(), prompts, GREEDY, LengthParams(8), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert without != out


def test_end_strings_read_backslash_escapes_from_the_command_line():
    """Hydra hands ``end_strings=["\\n\\nHuman:"]`` over literally; SamplingParams reads the escapes."""
    from nemo_aligner.generation import SamplingParams

    params = SamplingParams(end_strings=["\\n\\nHuman:", "a\\tb", "c\\\\d", "keep\\x", "\n\nreal"])
    assert params.end_strings == ["\n\nHuman:", "a\tb", "c\\d", "keep\\x", "\n\nreal"]


def test_response_seed_moved_unchanged_and_shared_with_the_generate_script():
    """``response_seed`` lives in nemo_aligner.generation (used by the online trainers and examples/.../generate.py);
    its values are the ones the script had, so generation files stay reproducible across the move."""
    from tests.helpers import load_example_script
    from nemo_aligner.generation import response_seed

    assert load_example_script("generate").response_seed is response_seed
    assert response_seed(1234, 5, 2) == 5823309164015794861 and response_seed(0, 0, 0) == 8866250585812870066
    assert len({response_seed(7, i, j) for i in range(50) for j in range(4)}) == 200
    assert all(0 <= response_seed(s, 3, 1) < 2**63 for s in range(20))
