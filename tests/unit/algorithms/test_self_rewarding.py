"""Self-rewarding / meta-rewarding pieces, each against values computed by hand: templates and the truncation of
over-long judge prompts, score parsing, the range filter and averaging, pair selection (rho = 0 and rho > 0), bad
samples, the Bradley-Terry Elo fit, meta-pair balancing and mixing, the per-iteration schedules, and the reference
and optimizer resets of the policy at an iteration boundary."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.algorithms.llm_judge import (
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_META_JUDGE_PROMPT,
    SCORE_PATTERN,
    WINNER_PATTERN,
    aggregate_scores,
    build_reward_regex,
    close_justification,
    fit_judge_prompt,
    fit_judge_request,
    judge_prompt_text,
    judge_request_ids,
    parse_score,
    parse_winner,
    render_template,
    strip_score,
)
from nemo_aligner.algorithms.self_rewarding import (
    Candidate,
    SelfRewardingConfig,
    balance_meta_pairs,
    bradley_terry_elo,
    compute_self_rewarding_max_steps,
    mix_meta_pairs,
    select_pair,
    value_for_iteration,
)
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.utils.config import ConfigValueError

from tests.helpers import compose_config

JUDGE = build_reward_regex("(?i)(?:Score|Points): {{ reward }}", SCORE_PATTERN)
META = build_reward_regex("(?i)Winner: (?:Judgement|Judgment) {{ reward }}", WINNER_PATTERN)


# ---- templates ----------------------------------------------------------------------------------------------------
def test_render_template_fills_the_fields():
    assert render_template("P={{ prompt }} R={{ response }}", prompt="hi", response="yo") == "P=hi R=yo"
    text = render_template(DEFAULT_JUDGE_PROMPT, prompt="What is 2+2?", response="4")
    assert "<prompt>What is 2+2?</prompt>\n<response>4</response>" in text
    assert 'Conclude with the score using the format: "Score: <total points>"' in text
    meta = render_template(DEFAULT_META_JUDGE_PROMPT, prompt="q", response="r", judgement_a="JA", judgement_b="JB")
    assert "<judgement A>JA</judgement A>\n<judgement B>JB</judgement B>" in meta
    assert meta.endswith('"Winner: [Judgement A | Judgement B]"')


def test_render_template_names_a_missing_field():
    with pytest.raises(ConfigValueError, match="'promt' is undefined"):
        render_template("{{ promt }}", prompt="x", response="y")


def _words(text):
    return len(text.split())


def _cut(text, n, keep_end):
    words = text.split()
    return " ".join(words[n:] if keep_end else words[: len(words) - n])


def test_fit_judge_prompt_cuts_the_prompt_from_the_left_first():
    template = "Q: {{ prompt }} A: {{ response }} end"
    fields = {"prompt": "a b c d e f", "response": "x y z"}  # 3 + 6 + 3 = 12 words
    assert fit_judge_prompt(template, fields, _words, 12, _cut) == ("Q: a b c d e f A: x y z end", False)
    # 4 words too many: the prompt keeps its last 2 words (the open question)
    assert fit_judge_prompt(template, fields, _words, 8, _cut) == ("Q: e f A: x y z end", True)


def test_fit_judge_prompt_then_cuts_the_response_from_the_right():
    template = "Q: {{ prompt }} A: {{ response }} end"
    fields = {"prompt": "a b c d e f", "response": "x y z"}
    # 7 too many: the whole prompt goes (6), then the response loses its last word
    text, truncated = fit_judge_prompt(template, fields, _words, 5, _cut)
    assert (text, truncated) == ("Q:  A: x y end", True) and _words(text) == 5
    with pytest.raises(ConfigValueError, match="the judge template alone is 3 tokens, more than the 2"):
        fit_judge_prompt(template, fields, _words, 2, _cut)


def test_judge_prompt_text_normalises_hh_transcripts():
    hh = "\n\nHuman: Hi there\n\nAssistant:"
    assert judge_prompt_text(hh, None, normalise=False) == hh
    assert judge_prompt_text(hh, None, normalise=True) == "User: Hi there"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]
    assert judge_prompt_text(messages, None, normalise=True) == "User: Hi\n\nAssistant: Yo\n\nUser: ?"


def test_fit_judge_request_counts_the_chat_template_tokens_and_cuts_the_prompt_first(tokenizer):
    template = "Q: {{ prompt }} A: {{ response }}"
    fields = {"prompt": "one two three four five six seven eight nine ten", "response": "yes"}
    whole = judge_request_ids(render_template(template, **fields), tokenizer)
    assert fit_judge_request(template, fields, tokenizer, len(whole)) == render_template(template, **fields)
    cut = fit_judge_request(template, fields, tokenizer, len(whole) - 3)
    assert len(judge_request_ids(cut, tokenizer)) <= len(whole) - 3  # the chat template's tokens count too
    assert cut.endswith("ten A: yes") and not cut.startswith("Q: one")


@pytest.mark.parametrize("text, expected", [
    ("Helpful and clear.\nScore:", "Helpful and clear.\n"),  # stopped at the score prefix: cut before it
    ("Helpful.  ", "Helpful.\n"),                              # cut by the length limit: closed by a newline
    ("   ", ""),                                               # nothing written: nothing kept
])
def test_close_justification_cuts_before_the_score_prefix(text, expected):
    assert close_justification(text, "Score: ") == expected


# ---- parsing, range filter, averaging -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Relevant and useful. Score: 4", 4.0),
    ("points: 3 so far ... Score: 2", 2.0),     # the last match is the conclusion
    ("score: 2.5", 2.5),                         # (?i), decimals
    ("Score: 7", None),                          # out of [0, 5]: dropped
    ("Score: -1", None),
    ("I cannot judge this.", None),
])
def test_parse_score(text, expected):
    assert parse_score(text, JUDGE, 0, 5) == expected


def test_parse_winner_and_strip_score():
    assert parse_winner("A is vague. Winner: Judgement B", META) == "B"
    assert parse_winner("winner: judgment a", META) == "A"
    assert parse_winner("Both are fine.", META) is None
    assert strip_score("Clear answer. Score: 4", JUDGE) == "Clear answer."


def test_aggregate_scores_averages_the_valid_judgements():
    assert aggregate_scores([4.0, None, 2.0]) == (3.0, 1.0, 2)  # mean 3, population variance ((1)^2 + (1)^2) / 2
    assert aggregate_scores([5.0, 5.0, 2.0]) == (4.0, 2.0, 3)   # ((1 + 1 + 4) / 3)
    assert aggregate_scores([None, None]) == (None, None, 0)


# ---- pair selection -----------------------------------------------------------------------------------------------
def _c(score, variance=0.0, length=5, ended=True, tokens=None):
    return Candidate(score, variance, length, ended, tuple(tokens if tokens is not None else [length, int(score or 0)]))


def test_select_pair_rho_zero_takes_the_lowest_variance_at_the_extremes():
    candidates = [_c(4, 1.0, tokens=[1]), _c(2, 0.0, tokens=[2]), _c(4, 0.0, tokens=[3]), _c(2, 0.5, tokens=[4])]
    assert select_pair(candidates, 0.0) == (2, 1)


def test_select_pair_rho_positive_takes_the_shortest_chosen_and_longest_rejected():
    # s_max = 5, s_min = 1, rho = 0.5: chosen window [3, 5] = {0, 1, 4}, rejected window [1, 3] = {2, 3, 4}
    candidates = [_c(5, length=10), _c(4, length=3), _c(1, length=7), _c(2, length=9), _c(3, length=2)]
    assert select_pair(candidates, 0.5) == (4, 3)
    # rho = 0: the windows are the extreme scores themselves
    assert select_pair(candidates, 0.0) == (0, 2)


@pytest.mark.parametrize("candidates", [
    [_c(5), _c(None), _c(1, ended=False)],         # one candidate with a score that ended
    [_c(3, tokens=[1]), _c(3, tokens=[2])],        # equal scores
    [_c(5, tokens=[7, 8]), _c(1, tokens=[7, 8])],  # identical tokens
    [_c(5, length=4, tokens=[1]), _c(1, length=4, tokens=[1])],
])
def test_select_pair_bad_samples(candidates):
    assert select_pair(candidates, 0.0) is None


def test_select_pair_rho_one_windows_span_every_score():
    # rho = 1: both windows are [s_min, s_max]; the shortest is chosen, the longest rejected, whatever their scores
    assert select_pair([_c(5, length=9, tokens=[1]), _c(1, length=2, tokens=[2])], 1.0) == (1, 0)
    assert select_pair([_c(5, length=2, tokens=[1]), _c(1, length=2, tokens=[2])], 1.0) is None  # the same one


# ---- Bradley-Terry Elo --------------------------------------------------------------------------------------------
def test_bradley_terry_two_players_known_case():
    # A beats B 3 times, B beats A once: the MLE of w_A - w_B is log(3); the (tiny) L2 penalty makes w_A = -w_B
    elo = bradley_terry_elo(2, [(0, 1), (0, 1), (0, 1), (1, 0)])
    assert elo[0] == pytest.approx(1000 + 200 * math.log(3), abs=1e-3)
    assert elo[1] == pytest.approx(1000 - 200 * math.log(3), abs=1e-3)


def test_bradley_terry_orders_a_chain_and_leaves_idle_players_at_1000():
    elo = bradley_terry_elo(4, [(0, 1), (1, 2), (0, 2), (0, 1), (2, 1)], l2=1.0)
    assert elo[0] > elo[2] > elo[1] or elo[0] > elo[1] > elo[2]
    assert elo[0] == max(elo) and elo[3] == pytest.approx(1000.0)
    assert sum(elo[:3]) == pytest.approx(3000.0, abs=1e-6)  # with an L2 penalty the coefficients sum to 0
    assert bradley_terry_elo(3, []) == [1000.0] * 3


# ---- meta pairs ---------------------------------------------------------------------------------------------------
def _pairs(classes):
    return [{"class": c, "id": i} for i, c in enumerate(classes)]


def test_balance_meta_pairs_caps_every_class():
    # {5: 3, 3: 2, 2: 2}, 40 %: cap 3 -> 7 kept, 3 > 2.8; cap 2 -> 6 kept, 2 <= 2.4
    kept, dropped = balance_meta_pairs(_pairs([5, 5, 3, 5, 2, 3, 2]), 0.4)
    assert [p["id"] for p in kept] == [0, 1, 2, 4, 5, 6] and [p["id"] for p in dropped] == [3]
    # {5: 4, 3: 1, 2: 1}: only one of each class fits (1/3 <= 40 %)
    kept, dropped = balance_meta_pairs(_pairs([5, 5, 5, 5, 3, 2]), 0.4)
    assert [p["id"] for p in kept] == [0, 4, 5] and len(dropped) == 3
    assert balance_meta_pairs([], 0.4) == ([], [])


def test_mix_meta_pairs_replaces_bad_samples_first_then_policy_pairs_up_to_the_share():
    policy = [{"id": "P0"}, None, {"id": "P2"}, {"id": "P3"}]
    meta = [{"id": "M0"}, {"id": "M1"}, {"id": "M2"}]
    batch, used = mix_meta_pairs(policy, meta, 0.5)  # at most 2 of 4
    assert [p["id"] for p in batch] == ["P0", "M0", "P2", "M1"] and used == 2
    assert all(p.get("meta") for p in batch if p["id"].startswith("M"))
    batch, used = mix_meta_pairs(policy, meta, -1)  # no cap: bad slot, then from the end
    assert [p["id"] for p in batch] == ["P0", "M0", "M2", "M1"] and used == 3
    batch, used = mix_meta_pairs(policy, meta, 0.0)
    assert batch == policy and used == 0


# ---- schedules and run length --------------------------------------------------------------------------------------
def test_value_for_iteration():
    assert [value_for_iteration([0.1, 0.2, 0.3], i) for i in range(4)] == [0.1, 0.2, 0.3, 0.3]
    assert value_for_iteration(0.05, 2) == 0.05


def _cfg(*overrides):
    return SelfRewardingConfig.from_cfg(compose_config("gpt_self_rewarding", list(overrides)))


def test_per_iteration_beta_and_rho_reach_the_loss():
    cfg = _cfg("model.spin.ref_policy_kl_penalty=[0.1,0.2,0.4]", "model.spin.length_control=[0.0,0.25,0.5]")
    assert [cfg.loss_config(i).ref_policy_kl_penalty for i in range(3)] == [0.1, 0.2, 0.4]
    assert [value_for_iteration(cfg.length_control, i) for i in range(3)] == [0.0, 0.25, 0.5]
    with pytest.raises(ConfigValueError, match=r"model.spin.ref_policy_kl_penalty has 2 values for "
                                               r"trainer.self_rewarding.max_iterations=3"):
        _cfg("model.spin.ref_policy_kl_penalty=[0.1,0.2]")
    with pytest.raises(ConfigValueError, match="model.spin.length_control"):
        _cfg("model.spin.length_control=1.5")


def test_max_steps_is_steps_per_epoch_times_epochs_times_iterations():
    cfg = _cfg("model.global_batch_size=2", "trainer.self_rewarding.max_epochs=2")
    assert compute_self_rewarding_max_steps(11, cfg) == (30, 5)      # 5 * 2 * 3
    cfg.limit_train_batches = 2
    assert compute_self_rewarding_max_steps(11, cfg) == (12, 2)
    cfg.limit_train_batches = 0.5
    assert compute_self_rewarding_max_steps(11, cfg) == (12, 2)      # int(5 * 0.5)
    cfg.max_steps = 7
    assert compute_self_rewarding_max_steps(11, cfg) == (7, 2)
    with pytest.raises(ConfigValueError, match="nothing to train: 1 prompts"):
        compute_self_rewarding_max_steps(1, cfg)


# ---- the policy at an iteration boundary ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fabric():
    from nemo_aligner.utils.runtime import build_fabric

    return build_fabric(OmegaConf.create({"accelerator": "cpu", "devices": 1}), seed=3)


def _policy(fabric, model_dir, lora):
    from nemo_aligner.models.hf_causal_lm import HFCausalLM

    peft = {"peft_scheme": "lora", "lora_tuning": {"target_modules": ["attention_qkv"], "adapter_dim": 4, "alpha": 8}} \
        if lora else {"peft_scheme": "none"}
    cfg = OmegaConf.create({"optim": {"name": "adamw", "lr": 5e-2, "sched": {}}, "peft": peft})
    return HFCausalLM(fabric, cfg, str(model_dir), max_steps=10, need_reference=True)


def _train_step(policy, batch):
    policy.prepare_for_training_step()
    with policy.accumulate(is_last=True):
        policy.backward(-policy.get_logprobs(batch).mean())
    policy.finish_training_step()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reference_and_optimizer_reset_at_the_iteration_boundary(fabric, tiny_model_dir, tokenizer, lora):
    policy = _policy(fabric, tiny_model_dir, lora)
    ids = tokenizer("Human: tea? Assistant: yes the quick brown fox", add_special_tokens=False)["input_ids"] + [2]
    batch = collate_sequences([{"input_ids": ids, "prompt_length": 4}], policy.pad_token_id)
    ref0 = policy.get_logprobs(batch, reference=True).detach()
    _train_step(policy, batch)
    _train_step(policy, batch)
    trained = policy.get_logprobs(batch).detach()
    assert not torch.allclose(trained, ref0)
    assert torch.equal(policy.get_logprobs(batch, reference=True), ref0)  # the reference is still the start
    assert len(policy.optimizer.optimizer.state) > 0
    state_tensors = [t for s in policy.optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert any(float(t.abs().sum()) > 0 for t in state_tensors)

    # reference_weights(): the policy runs with the reference weights inside, its own weights are back after
    with policy.reference_weights():
        assert torch.equal(policy.get_logprobs(batch).detach(), ref0)
    assert torch.equal(policy.get_logprobs(batch).detach(), trained)

    policy.reset_reference_to_policy()
    assert torch.equal(policy.get_logprobs(batch, reference=True), trained)
    with policy.reference_weights():
        assert torch.equal(policy.get_logprobs(batch).detach(), trained)
    policy.reset_optimizer()
    assert len(policy.optimizer.optimizer.state) == 0

    # the next step moves the policy away from the new reference, which stays put; Adam restarts at step 1
    _train_step(policy, batch)
    assert not torch.equal(policy.get_logprobs(batch).detach(), trained)
    assert torch.equal(policy.get_logprobs(batch, reference=True), trained)
    assert all(float(s["step"]) == 1.0 for s in policy.optimizer.optimizer.state.values())


def test_constrained_scores_one_forward_equals_one_sequence_per_candidate(fabric, tiny_model_dir, tokenizer):
    """The constrained judge's single-token fast path (every candidate asked at the context's last position) gives
    the log-probabilities of scoring each ``context + candidate`` as its own sequence."""
    from types import SimpleNamespace

    from nemo_aligner.algorithms.self_rewarding import SelfRewardingTrainer

    policy = _policy(fabric, tiny_model_dir, lora=False)
    owner = SimpleNamespace(cfg=SimpleNamespace(rollout_micro_batch_size=3), judge_policy=policy)
    contexts = [tokenizer("Score: ", add_special_tokens=False)["input_ids"],
                tokenizer("the quick brown fox. Score: ", add_special_tokens=False)["input_ids"]]
    singles = [[t] for t in tokenizer("0 1 2 3", add_special_tokens=False)["input_ids"][:4]]
    with policy.inference():
        fast = SelfRewardingTrainer.candidate_logprobs(owner, contexts, singles)
        slow = SelfRewardingTrainer.candidate_logprobs(owner, contexts, singles + [[singles[0][0], singles[1][0]]])
    assert fast.shape == (2, 4) and torch.allclose(fast, slow[:, :4], atol=1e-5)
    # a two-token candidate is the sum of its tokens' log-probabilities: below either of its prefixes' alone
    assert bool((slow[:, 4] < slow[:, 0]).all())


@pytest.mark.parametrize("override, message", [
    ("model.spin.length_control=[0.0,2.0,0.1]", "model.spin.length_control=2.0: expected a number >= 0 and <= 1"),
    ("model.spin.ref_policy_kl_penalty=0", "model.spin.ref_policy_kl_penalty=0: expected a number > 0"),
    ("model.spin.preference_loss=foo", "model.spin.preference_loss='foo': expected one of dpo, ipo"),
    ("+model.spin.judge_scor_low=1", "unknown config key 'model.spin.judge_scor_low' in gpt_self_rewarding config "
                                     "(did you mean 'model.spin.judge_score_low'?)"),
    ("model.spin.judge_score_high=0", "model.spin.judge_score_low=0 must be < judge_score_high=0"),
    ("model.spin.judge_reward_regex=Score", "model.spin.judge_reward_regex='Score' has no '{{ reward }}'"),
    # issue 25: templates were read only when the first judgement was rendered (or parsed)
    ("model.spin.llm_judge_prompt='Rate: {{ prompt }}'",
     "model.spin.llm_judge_prompt: the template has no {{ response }} slot; add it (the template's fields: prompt, "
     "response)"),
    ("model.spin.llm_judge_prompt='{{ promt }} {{ response }}'",
     "model.spin.llm_judge_prompt: the template uses {{ promt }}, which is not one of its fields (prompt, response)"),
    ("model.spin.llm_judge_prompt='{{ response '", "model.spin.llm_judge_prompt: not a valid Jinja template"),
    ("model.spin.llm_meta_judge_prompt='A: {{ judgement_a }}'",
     "model.spin.llm_meta_judge_prompt: the template has no {{ judgement_b }} slot"),
    ("model.spin.judge_reward_regex='Score: ({{ reward }}'",
     "model.spin.judge_reward_regex='Score: ({{ reward }}': not a valid regular expression (missing ), unterminated"),
    ("model.spin.meta_judge_reward_regex='Winner: (A|B)'",
     "model.spin.meta_judge_reward_regex='Winner: (A|B)' has no '{{ reward }}' slot"),
])
def test_bad_config_names_the_key(override, message):
    from nemo_aligner.recipes.common import check_config

    cfg = compose_config("gpt_self_rewarding", [override])
    with pytest.raises((ConfigValueError, KeyError)) as err:
        check_config(cfg, "gpt_self_rewarding")
        SelfRewardingConfig.from_cfg(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("model.spin.judge_reward_regex='Score: (\\d)'",
     "model.spin.judge_reward_regex='Score: (\\\\d)' has no '{{ reward }}' slot"),
    ("model.spin.llm_judge_prompt='Rate: {{ prompt }}'", "the template has no {{ response }} slot"),
])
def test_judge_templates_are_checked_when_the_config_is_read(override, message):
    """check_config alone (what runs before trainer.ray.enable hands the run to Ray Train workers) rejects them."""
    from nemo_aligner.recipes.common import check_config

    with pytest.raises(ConfigValueError) as err:
        check_config(compose_config("gpt_self_rewarding", [override]), "gpt_self_rewarding")
    assert message in str(err.value)


def test_good_judge_templates_pass_and_the_regex_slot_may_be_spaced():
    from nemo_aligner.recipes.common import check_config

    cfg = compose_config("gpt_self_rewarding", ["model.spin.llm_judge_prompt='Q {{ prompt }} A {{ response }}'",
                                                "model.spin.llm_meta_judge_prompt='{{ judgement_a }} {{ judgement_b }}'",
                                                "model.spin.judge_reward_regex='Score: {{reward}}'"])
    check_config(cfg, "gpt_self_rewarding")
    sr = SelfRewardingConfig.from_cfg(cfg)
    assert build_reward_regex(sr.judge_reward_regex, SCORE_PATTERN).search("Score: 4").group(1) == "4"
