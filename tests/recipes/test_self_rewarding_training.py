"""The self-rewarding recipe end to end on a tiny Llama whose judgements come from a scripted, deterministic judge
behind ``model.generate`` (:class:`tests.helpers.ScriptedJudge`): which pairs are trained, that the DPO loss falls,
the iteration boundary, the meta-judge's pairs, the constrained judge on the real model, and a kill-and-resume
mid-iteration that gives the same losses as an uninterrupted run."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from nemo_aligner.algorithms.self_rewarding import SelfRewardingTrainer

from tests.helpers import (
    Killed,
    ScriptedJudge,
    load_example_script,
    response_score,
    sr_cfg,
    write_prompts_with_answers,
)


@pytest.fixture(scope="module")
def script():
    return load_example_script("train_gpt_self_rewarding")


def _record_trained_pairs(monkeypatch):
    trained: list[list[dict | None]] = []
    original = SelfRewardingTrainer.train_on_pairs

    def spy(self, pairs, loss_cfg):
        trained.append([None if p is None else dict(p) for p in pairs])
        return original(self, pairs, loss_cfg)

    monkeypatch.setattr(SelfRewardingTrainer, "train_on_pairs", spy)
    return trained


def test_trains_the_pairs_the_judge_picks_and_the_loss_falls(tmp_path, tiny_model_dir, script, monkeypatch):
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl")
    trained = _record_trained_pairs(monkeypatch)
    judges: list[ScriptedJudge] = []
    tables = []
    monkeypatch.setattr("nemo_aligner.recipes.common.table_sink", lambda loggers: lambda *t: tables.append(t))
    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "trainer.self_rewarding.max_iterations=2",
                 "trainer.self_rewarding.max_epochs=2", "model.spin.ref_policy_kl_penalty=[0.5,1.0]",
                 "trainer.self_rewarding.save_interval=0")
    out = script.run(cfg, policy_wrapper=lambda p: judges.append(ScriptedJudge(p)) or judges[0])
    history, trainer, judge = out["history"], out["trainer"], judges[0]
    assert len(history) == 16  # 16 prompts / 4 per step = 4 steps per epoch, x 2 epochs x 2 iterations
    assert [h["iteration"] for h in history] == [0.0] * 8 + [1.0] * 8
    assert [h["beta"] for h in history] == [0.5] * 8 + [1.0] * 8

    # which pairs: per prompt, chosen = the first response with the highest score, rejected = the first with the
    # lowest (one judgement each, so every variance is 0); equal scores are bad samples
    tok = trainer.tokenizer
    n = 4
    assert len(judge.responses) == 16 * 4 * n
    for step, pairs in enumerate(trained):
        rows = judge.responses[step * 4 * n:(step + 1) * 4 * n]
        bad = 0
        for p, pair in enumerate(pairs):
            group = [r for _, r in rows[p * n:(p + 1) * n]]
            scores = [response_score(tok.decode([t for t in r if t != tok.eos_token_id], skip_special_tokens=True))
                      for r in group]
            if max(scores) == min(scores):
                assert pair is None, (step, p, scores)
                bad += 1
                continue
            assert pair["chosen_ids"] == group[scores.index(max(scores))], (step, p)
            assert pair["rejected_ids"] == group[scores.index(min(scores))], (step, p)
            assert (pair["chosen_score"], pair["rejected_score"]) == (max(scores), min(scores))
            assert pair["prompt_ids"] == rows[p * n][0]
        assert history[step]["bad_samples_per_GBS"] == bad / 4
        assert history[step]["judge_parse_rate"] == 1.0
        assert history[step]["bad_ends_per_GBS"] == 0.0
    # the first step of an iteration starts from policy == reference: the DPO loss is exactly log 2
    assert history[0]["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[8]["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the policy learns what the judge rewards: later pairs are already ranked right, the loss falls
    first_iteration = [h["preference_loss"] for h in history[:8] if h["pairs_trained"] > 0]
    assert sum(first_iteration[-3:]) / 3 < math.log(2) - 0.02, first_iteration
    assert history[7]["acc"] > 0.5
    # the pair table, the checkpoint (with the iteration) and the export
    log_dir = tmp_path / "run"
    assert (log_dir / "hf_export" / "config.json").is_file()
    assert (log_dir / "checkpoints" / "iteration_starts" / "iteration=1" / "state.pt").is_file()
    table = sorted((log_dir / "val_samples").glob("step=*.md"))[-1].read_text()
    assert "| # | kind | prompt | chosen | rejected | chosen score | rejected score |" in table
    assert out["val"]["loss"] > 0
    # the pair table also went to the table sink (a W&B table when W&B is on), with the last step's pairs
    key, columns, rows, step = tables[-1]
    assert (key, step) == ("val/pairs", 16)
    assert columns == ["kind", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
    last = [p for p in trained[-1] if p is not None]
    assert [(r[4], r[5]) for r in rows] == [(p["chosen_score"], p["rejected_score"]) for p in last][: len(rows)]


def test_meta_judge_pairs_prefer_the_judgement_the_meta_judge_picks(tmp_path, tiny_model_dir, script, monkeypatch):
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl")
    trained = _record_trained_pairs(monkeypatch)
    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "trainer.self_rewarding.max_iterations=1",
                 "model.spin.num_evals_to_average=2", "model.spin.use_meta_judge=true",
                 "model.spin.meta_judge_pcnt=0.5", "model.spin.meta_max_relative_pcnt=1.0",
                 "trainer.self_rewarding.save_interval=0")
    out = script.run(cfg, policy_wrapper=lambda p: ScriptedJudge(p, vary_by_seed=True))
    tok = out["trainer"].tokenizer
    meta = [p for pairs in trained for p in pairs if p is not None and p.get("meta")]
    assert meta, "no meta pair was trained"
    assert all(len([p for p in pairs if p is not None and p.get("meta")]) <= 2 for pairs in trained)  # 50 % of 4
    for pair in meta:
        chosen, rejected = tok.decode(pair["chosen_ids"]), tok.decode(pair["rejected_ids"])
        assert chosen.startswith("Reason r0.") and rejected.startswith("Reason r1."), (chosen, rejected)
        assert tok.decode(pair["prompt_ids"]).find("JUDGE ") >= 0
    assert all(h["meta_judge_parse_rate"] == 1.0 for h in out["history"] if not math.isnan(h["meta_judge_parse_rate"]))


def test_constrained_judge_always_parses_on_the_real_model(tmp_path, tiny_model_dir, script):
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=4)
    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "trainer.self_rewarding.max_iterations=1",
                 "model.spin.constrain_judge_output=true", "model.spin.num_evals_to_average=2",
                 "model.spin.use_meta_judge=true", "trainer.self_rewarding.save_interval=0",
                 "model.spin.judge_max_length=4")
    out = script.run(cfg)  # the tiny random model judges for real: its free text never holds "Score: <n>"
    assert [h["judge_parse_rate"] for h in out["history"]] == [1.0]
    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "trainer.self_rewarding.max_iterations=1",
                 "model.spin.constrain_judge_output=false", "model.spin.num_evals_to_average=2",
                 "trainer.self_rewarding.save_interval=0", "model.spin.judge_max_length=4", run="free")
    out = script.run(cfg)
    assert [h["judge_parse_rate"] for h in out["history"]] == [0.0]
    assert out["history"][0]["bad_samples_per_GBS"] == 1.0 and out["history"][0]["pairs_trained"] == 0


def test_kill_and_resume_mid_iteration_gives_the_same_losses(tmp_path, tiny_model_dir, script):
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    overrides = ["trainer.self_rewarding.max_iterations=2", "model.spin.num_evals_to_average=2",
                 "model.spin.use_meta_judge=true", "model.spin.meta_judge_pcnt=0.5"]
    wrap = lambda p: ScriptedJudge(p, vary_by_seed=True)  # noqa: E731
    straight = script.run(sr_cfg(tmp_path, tiny_model_dir, prompts, *overrides, run="straight"), policy_wrapper=wrap)
    assert len(straight["history"]) == 4  # 2 steps per iteration

    class DiesAfterStep3(ScriptedJudge):
        def save_checkpoint(self, path, extra_state):
            self._policy.save_checkpoint(path, extra_state)
            if "step=" in path and extra_state["step"] == 3:  # mid-iteration 1, after its reference was reset
                raise Killed

    before: list[dict] = []
    with pytest.raises(Killed):
        script.run(sr_cfg(tmp_path, tiny_model_dir, prompts, *overrides, run="resumed"),
                   policy_wrapper=lambda p: before.append(DiesAfterStep3(p, vary_by_seed=True)) or before[-1])
    resumed = script.run(sr_cfg(tmp_path, tiny_model_dir, prompts, *overrides, run="resumed"), policy_wrapper=wrap)
    assert len(resumed["history"]) == 1 and resumed["trainer"].iteration == 1
    keys = ("loss", "preference_loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean", "bad_samples_per_GBS",
            "judge_parse_rate", "iteration", "beta")
    assert [{k: straight["history"][3][k] for k in keys}] == [{k: resumed["history"][0][k] for k in keys}]
    # the whole loss sequence (steps 1-3 logged by the killed run, step 4 by the resumed one) is the straight run's
    def losses(run):
        rows = list(csv.DictReader(open(tmp_path / run / "csv" / "metrics.csv")))
        return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]

    assert losses("resumed") == losses("straight") and len(losses("straight")) == 4
    # the resumed step saw the same weights: the exported policies are the same to the bit
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "hf_export" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "hf_export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.vllm
def test_vllm_engine_runs_the_loop_with_the_reference_weights(tmp_path, vllm_model_dir, script):
    """Two iterations with vLLM generating the responses (the scripted judge answers the judge requests): the loop
    trains, each step reports its refit time, and the engine's last weights are the last iteration's reference."""
    from tests.helpers import vllm_overrides

    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    cfg = sr_cfg(tmp_path, vllm_model_dir, prompts, *vllm_overrides("self_rewarding"),
                 "trainer.self_rewarding.max_iterations=2", "trainer.self_rewarding.save_interval=0")
    out = script.run(cfg, policy_wrapper=ScriptedJudge)
    history = out["history"]
    assert [h["iteration"] for h in history] == [0.0, 0.0, 1.0, 1.0]
    assert history[0]["time_refit"] > 0 and history[2]["time_refit"] > 0  # a new reference each iteration
    assert history[1]["time_refit"] == 0.0  # the same reference weights within an iteration: no refit
    assert any(h["pairs_trained"] > 0 for h in history)
    policy = out["trainer"].policy  # the ScriptedJudge forwards attributes to the HFCausalLM
    assert policy._engine.holder[1:] == ("reference", policy._reference_version) and policy._reference_version >= 1


@pytest.mark.vllm
def test_constrained_judge_with_vllm_decodes_the_score_under_structured_outputs(tmp_path, vllm_model_dir, script,
                                                                               monkeypatch):
    """``constrain_judge_output=true`` with vLLM: the scripted judge writes the justification, the engine's
    structured outputs pick the score (every judgement parses), and the trainer's log-prob scoring is not used."""
    from nemo_aligner.generation.vllm_engine import VLLMEngine
    from tests.helpers import vllm_overrides

    calls = []
    original = VLLMEngine.generate_choices

    def spy(self, prompt_ids, choices, sampling_params, seeds):
        picks = original(self, prompt_ids, choices, sampling_params, seeds)
        calls.append((list(choices), picks))
        return picks

    monkeypatch.setattr(VLLMEngine, "generate_choices", spy)
    monkeypatch.setattr(SelfRewardingTrainer, "candidate_logprobs",
                        lambda *a: pytest.fail("the native log-prob pick ran with a vLLM engine"))
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    cfg = sr_cfg(tmp_path, vllm_model_dir, prompts, *vllm_overrides("self_rewarding"),
                 "trainer.self_rewarding.max_iterations=1", "trainer.self_rewarding.save_interval=0",
                 "model.spin.constrain_judge_output=true", "model.spin.num_evals_to_average=2")
    history = script.run(cfg, policy_wrapper=ScriptedJudge)["history"]
    assert len(history) == 2 and all(h["judge_parse_rate"] == 1.0 for h in history)
    assert all(choices == ["0", "1", "2", "3", "4", "5"] for choices, _ in calls)
    # every judgement: 2 steps x 4 prompts x 4 responses x 2 judgements, in rollout micro-batches of 8
    assert [len(picks) for _, picks in calls] == [8] * 8


@pytest.mark.parametrize("constrain", [False, True])
def test_a_separate_judge_behind_an_openai_endpoint_picks_the_pairs(tmp_path, tiny_model_dir, script, monkeypatch,
                                                                    constrain):
    """``model.spin.judge_endpoint``: every judgement comes from the endpoint (the policy only generates), its scores
    pick the pairs exactly as the scripted judge's do, and with ``constrain_judge_output`` each request carries the
    structured-output regex."""
    from tests.helpers import FakeJudgeServer

    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    trained = _record_trained_pairs(monkeypatch)

    def answer(content, payload):
        assert content.startswith("JUDGE ")  # the rendered judge template, as text
        return f"Fine. Score: {response_score(content[len('JUDGE '):])}"

    generated: list[int] = []
    with FakeJudgeServer(answer) as server:
        cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "trainer.self_rewarding.max_iterations=1",
                     "trainer.self_rewarding.save_interval=0", f"model.spin.judge_endpoint={server.base_url}",
                     "model.spin.judge_model=big-judge", f"model.spin.constrain_judge_output={str(constrain).lower()}")

        out = script.run(cfg, policy_wrapper=_count_policy_generations(generated))
    history, tok = out["history"], out["trainer"].tokenizer
    assert len(history) == 2 and all(h["judge_parse_rate"] == 1.0 for h in history)
    assert sum(generated) == 2 * 4 * 4  # the policy generated the responses only: steps x prompts x responses
    assert len(server.requests) == 2 * 4 * 4  # one judgement each (num_evals_to_average=1)
    payload = server.requests[0][0]
    assert payload["model"] == "big-judge" and payload["max_tokens"] == (4 * 12 + 7 + 1 if constrain else 12)
    assert ("structured_outputs" in payload) == constrain
    for pairs in trained:
        for pair in pairs:
            if pair is not None:
                chosen = tok.decode([t for t in pair["chosen_ids"] if t != tok.eos_token_id], skip_special_tokens=True)
                assert pair["chosen_score"] == response_score(chosen)
                assert pair["chosen_score"] > pair["rejected_score"]


def test_a_judge_endpoint_without_a_model_name_is_refused(tmp_path, tiny_model_dir, script):
    from nemo_aligner.utils.config import ConfigValueError

    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "model.spin.judge_endpoint=http://127.0.0.1:8000/v1")
    with pytest.raises(ConfigValueError, match="model.spin.judge_model"):
        script.run(cfg)


def _count_policy_generations(generated: list[int]):
    """A ``policy_wrapper`` that records the batch size of every ``policy.generate`` call and marks responses ended."""
    def wrap(policy):
        original = policy.generate

        def generate(prompt_ids, *args, **kwargs):
            generated.append(len(prompt_ids))
            out = original(prompt_ids, *args, **kwargs)
            return type(out)(out.response_ids, [True] * len(out.response_ids), logprobs=out.logprobs)

        policy.generate = generate
        return policy
    return wrap


def test_a_separate_judge_model_writes_every_judgement(tmp_path, tiny_model_dir, tiny_gpt2_dir, script, monkeypatch):
    """``model.spin.judge_model_path``: a second model in the process (here a GPT-2 judging a Llama policy) gets
    every judge request, the policy generates only the responses, and the judge's scores pick the pairs."""
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    trained = _record_trained_pairs(monkeypatch)
    generated: list[int] = []
    judges: list[ScriptedJudge] = []
    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "trainer.self_rewarding.max_iterations=1",
                 "trainer.self_rewarding.save_interval=0", f"model.spin.judge_model_path={tiny_gpt2_dir}")
    out = script.run(cfg, policy_wrapper=_count_policy_generations(generated),
                     judge_wrapper=lambda j: judges.append(ScriptedJudge(j)) or judges[0])
    history, trainer = out["history"], out["trainer"]
    assert trainer.judge_policy is judges[0] and trainer.judge_policy is not trainer.policy
    assert type(judges[0]._policy._lm).__name__ == "GPT2LMHeadModel"
    assert len(history) == 2 and all(h["judge_parse_rate"] == 1.0 for h in history)
    assert sum(generated) == 2 * 4 * 4  # the policy generated the responses only: steps x prompts x responses
    assert judges[0].responses == []  # the judge model got judge requests only
    tok = trainer.tokenizer
    pairs = [p for step in trained for p in step if p is not None]
    assert pairs
    for pair in pairs:
        chosen = tok.decode([t for t in pair["chosen_ids"] if t != tok.eos_token_id], skip_special_tokens=True)
        assert pair["chosen_score"] == response_score(chosen) and pair["chosen_score"] > pair["rejected_score"]


def test_a_separate_judge_model_judges_constrained_and_is_never_trained(tmp_path, tiny_model_dir, tiny_gpt2_dir,
                                                                        script):
    """The constrained judge on a real (random) separate judge model: every judgement and meta-judgement parses,
    its log-probabilities pick the verdicts (the policy's never do), and its weights do not change."""
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    generated: list[int] = []
    judge_logprob_calls: list[int] = []
    kept: dict = {}

    def spy(judge):
        kept["before"] = {k: v.clone() for k, v in judge._lm.state_dict().items()}
        original = judge.get_logprobs

        def get_logprobs(batch, *args, **kwargs):
            judge_logprob_calls.append(1)
            return original(batch, *args, **kwargs)

        judge.get_logprobs = get_logprobs
        kept["judge"] = judge
        return judge

    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "trainer.self_rewarding.max_iterations=1",
                 "trainer.self_rewarding.save_interval=0", f"model.spin.judge_model_path={tiny_gpt2_dir}",
                 "model.spin.constrain_judge_output=true", "model.spin.num_evals_to_average=2",
                 "model.spin.use_meta_judge=true", "model.spin.judge_max_length=4")
    history = script.run(cfg, policy_wrapper=_count_policy_generations(generated), judge_wrapper=spy)["history"]
    assert len(history) == 2 and all(h["judge_parse_rate"] == 1.0 for h in history)
    assert sum(generated) == 2 * 4 * 4 and judge_logprob_calls
    after = kept["judge"]._lm.state_dict()
    assert all(torch.equal(kept["before"][k], after[k]) for k in after)


def test_a_judge_endpoint_and_a_judge_model_path_together_are_refused(tmp_path, tiny_model_dir, script):
    from nemo_aligner.utils.config import ConfigValueError

    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "model.spin.judge_endpoint=http://127.0.0.1:8000/v1",
                 "model.spin.judge_model=big", f"model.spin.judge_model_path={tiny_model_dir}")
    with pytest.raises(ConfigValueError, match="exclusive"):
        script.run(cfg)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_each_iteration_starts_with_the_reference_equal_to_the_policy(tmp_path, tiny_model_dir, script, peft):
    """In the loop: the first step of every iteration has policy == reference (DPO loss exactly log 2, implicit
    rewards 0), later steps do not; with LoRA too (the reference is the iteration's starting adapters)."""
    prompts = write_prompts_with_answers(tmp_path / "prompts.jsonl", n=8)
    cfg = sr_cfg(tmp_path, tiny_model_dir, prompts, "trainer.self_rewarding.max_iterations=3",
                 "trainer.self_rewarding.max_epochs=2", f"model.peft.peft_scheme={peft}",
                 "model.peft.lora_tuning.adapter_dim=4", "trainer.self_rewarding.save_interval=0")
    history = script.run(cfg, policy_wrapper=ScriptedJudge)["history"]
    assert len(history) == 12 and [h["iteration"] for h in history] == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    for start in (0, 4, 8):
        assert history[start]["preference_loss"] == pytest.approx(math.log(2), abs=1e-6), start
        assert history[start]["rewards_chosen_mean"] == pytest.approx(0.0, abs=1e-6)
        later = [h for h in history[start + 1:start + 4] if h["pairs_trained"] > 0]
        assert later and all(abs(h["rewards_chosen_mean"] - h["rewards_rejected_mean"]) > 1e-6 for h in later)
