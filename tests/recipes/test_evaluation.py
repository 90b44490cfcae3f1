"""The held-out evaluation of a policy (``recipes/evaluate.py``, ``eval_policy.py``), the curves
(``python -m nemo_aligner.plot``) and the reference-run summaries (``python -m nemo_aligner.reference``)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from nemo_aligner.recipes.evaluate import distinct_n, evaluate_policy, response_kl
from tests.helpers import REPO, build_tiny_model, load_example_script
from tests.helpers.models import save_tiny_reward_model


# ---- the metrics, in closed form -----------------------------------------------------------------------------------
def test_distinct_n_counts_unique_ngrams_over_all_ngrams():
    responses = [[1, 2, 3], [1, 2, 4], [7]]
    assert distinct_n(responses, 1) == pytest.approx(5 / 7)  # {1, 2, 3, 4, 7} of 7 tokens
    assert distinct_n(responses, 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert distinct_n([[5, 5, 5, 5]], 2) == pytest.approx(1 / 3)  # a collapsed response
    assert distinct_n([[1]], 2) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(responses, 0)


def test_response_kl_is_the_summed_exact_kl_from_the_reference_to_the_policy():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    expected = sum(float((pi * (pi / qi).log()).sum()) for pi, qi in zip(p, q))
    assert float(response_kl(p.log(), q.log())) == pytest.approx(expected, rel=1e-9)
    # KL(pi || pi_ref), not KL(pi_ref || pi): the arguments' order matters
    reverse = sum(float((qi * (qi / pi).log()).sum()) for pi, qi in zip(p, q))
    assert abs(expected - reverse) > 1e-3
    assert float(response_kl(p.log() + 3.0, p.log())) == pytest.approx(0.0, abs=1e-12)  # logits shifted: same policy
    assert float(response_kl(torch.zeros(0, 5), torch.zeros(0, 5))) == 0.0
    with pytest.raises(ValueError, match="differ"):
        response_kl(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- a policy on a prompt file --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_model_dir, tokenizer):
    root = tmp_path_factory.mktemp("eval_policy")
    prompts = root / "prompts.jsonl"
    questions = ["How do I bake bread?", "What is two plus two?", "Tell me something rude.", "the quick brown fox"]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions * 2))
    rm = save_tiny_reward_model(root / "rm", tiny_model_dir, tokenizer)
    other = root / "other_policy"
    torch.manual_seed(3)
    model = build_tiny_model("llama", len(tokenizer), seed=1)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    return root, prompts, rm, other


def test_policy_against_itself_has_zero_kl_and_the_rm_scores_its_responses(eval_setup, tiny_model_dir):
    from nemo_aligner.models.reward_model import RewardScorer

    root, prompts, rm, other = eval_setup
    samples = root / "samples.jsonl"
    out = evaluate_policy(str(tiny_model_dir), str(prompts), str(rm), reference=str(tiny_model_dir), num_prompts=6,
                          max_new_tokens=8, batch_size=4, samples_file=str(samples))
    assert out["num_prompts"] == 6
    assert out["kl_mean"] == pytest.approx(0.0, abs=1e-9) and out["kl_max"] == pytest.approx(0.0, abs=1e-9)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 6 and all(0 < r["length"] <= 8 for r in rows)
    assert out["length_mean"] == pytest.approx(sum(r["length"] for r in rows) / 6)
    rewards = [r["reward"] for r in rows]
    assert out["reward_mean"] == pytest.approx(sum(rewards) / 6)
    # the rewards are the RM's scores of prompt + response tokens, as PPO scores a rollout
    scorer = RewardScorer.from_pretrained(str(rm))
    assert scorer.score([r["prompt_ids"] + r["response_ids"] for r in rows]) == pytest.approx(rewards, abs=1e-5)
    assert all(r["response"] == scorer.tokenizer.decode(r["response_ids"]) for r in rows)
    # greedy: the same prompts twice give the same responses (distinct-n counts them twice)
    assert rows[0]["response"] == rows[4]["response"] and 0 < out["distinct_2"] <= 1

    # another model as the reference: a positive KL
    against_other = evaluate_policy(str(tiny_model_dir), str(prompts), str(rm), reference=str(other), num_prompts=6,
                                    max_new_tokens=8, batch_size=4)
    assert against_other["kl_mean"] > 0.01
    assert against_other["reward_mean"] == pytest.approx(out["reward_mean"], abs=1e-5)  # same policy, same responses


def test_eval_policy_cli_prints_the_summary_and_writes_json(eval_setup, tiny_model_dir, capsys):
    root, prompts, rm, _ = eval_setup
    script = load_example_script("eval_policy")
    summary = script.main([str(tiny_model_dir), "--prompts", str(prompts), "--rm", str(rm), "--num-prompts", "3",
                           "--max-new-tokens", "4", "--output-json", str(root / "eval.json")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("reward_mean=") and line.endswith("num_prompts=3") and "kl_mean" not in line
    assert json.loads((root / "eval.json").read_text())["reward_mean"] == pytest.approx(summary["reward_mean"])
    proc = subprocess.run([sys.executable, str(REPO / "examples/nlp/gpt/eval_policy.py"), str(tiny_model_dir),
                           "--prompts", str(root / "missing.jsonl"), "--rm", str(rm)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "missing.jsonl" in proc.stderr


# ---- curves and summaries -------------------------------------------------------------------------------------------
def _write_metrics(run, rows):
    path = run / "csv" / "metrics.csv"
    path.parent.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_plot_draws_train_and_validation_curves_of_several_runs(tmp_path):
    from nemo_aligner.plot import plot_runs, read_metrics

    a, b = tmp_path / "a", tmp_path / "b"
    _write_metrics(a, [{"step": 1, "train/loss": 0.7, "train/acc": 0.5, "train/time_step": 3.0},
                       {"step": 2, "train/loss": 0.6, "train/acc": 0.6, "val/acc": 0.55, "val/loss": 0.65}])
    _write_metrics(b, [{"step": 1, "train/loss": 0.9, "train/kl": 0.1}, {"step": 2, "train/loss": "nan"}])
    series = read_metrics(a)
    assert series["train/loss"] == [(1.0, 0.7), (2.0, 0.6)] and series["val/acc"] == [(2.0, 0.55)]
    assert read_metrics(b)["train/loss"] == [(1.0, 0.9)]  # non-finite values are skipped
    png = tmp_path / "out" / "curves.png"
    panels = plot_runs([a, b], png)
    assert panels == ["loss", "accuracy", "KL (nats)"]  # time_* is not plotted
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, "-m", "nemo_aligner.plot", str(a), "--metrics", "acc", "-o",
                           str(tmp_path / "acc.png")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "acc.png (acc)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "nemo_aligner.plot", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "no metrics file" in proc.stderr


def test_reference_summaries_check_their_targets(tmp_path):
    from nemo_aligner.reference import write_summary

    rm = tmp_path / "rm"
    _write_metrics(rm, [{"step": 20, "train/loss": 0.69, "val/acc": 0.55}, {"step": 40, "train/loss": 0.6,
                                                                           "val/acc": 0.63}])
    (rm / "eval_validation.json").write_text(json.dumps({"acc": 0.63, "reward_margin": 0.4, "loss": 0.66,
                                                         "num_examples": 200}))
    out = write_summary("rm", rm, seconds=12.0)
    assert out["met"] == {"val_acc": True} and out["val_acc_curve"] == [[20.0, 0.55], [40.0, 0.63]]
    assert json.loads((rm / "summary.json").read_text())["wall_seconds"] == 12.0

    dpo = tmp_path / "dpo"
    _write_metrics(dpo, [{"step": 10, "val/acc": 0.6, "val/rewards_chosen_mean": 0.1, "val/rewards_rejected_mean": 0.0},
                         {"step": 20, "val/acc": 0.61, "val/rewards_chosen_mean": 0.1,
                          "val/rewards_rejected_mean": 0.05}])
    out = write_summary("dpo", dpo)
    assert out["met"] == {"val_acc": False, "val_reward_margin_grows": False}
    assert out["val_reward_margin"] == pytest.approx(0.05)

    ppo = tmp_path / "ppo"
    ppo.mkdir()
    base = {"reward_std": 1.0, "length_mean": 50, "ended_fraction": 1.0, "distinct_1": 0.2, "distinct_2": 0.5,
            "num_prompts": 200}
    (ppo / "eval_before.json").write_text(json.dumps({**base, "reward_mean": -0.2, "kl_mean": 0.0}))
    (ppo / "eval_after.json").write_text(json.dumps({**base, "reward_mean": 0.4, "kl_mean": 6.0}))
    out = write_summary("ppo", ppo)
    assert out["reward_gain"] == pytest.approx(0.6) and out["met"] == {"reward_gain": True, "kl": False}
    assert not math.isnan(out["after"]["distinct_2"])
    with pytest.raises(Exception, match="eval_before.json"):
        write_summary("rs", tmp_path / "rm")

    sr = tmp_path / "self_rewarding"
    sr.mkdir()
    (sr / "eval_before.json").write_text(json.dumps({**base, "reward_mean": -0.2, "judge_score_mean": 2.0}))
    with pytest.raises(Exception, match="eval_iteration_1.json"):
        write_summary("self_rewarding", sr)
    for i, (reward, judge) in enumerate([(0.1, 2.5), (0.3, 3.0)], start=1):
        (sr / f"eval_iteration_{i}.json").write_text(json.dumps({**base, "reward_mean": reward,
                                                                   "judge_score_mean": judge, "kl_mean": i}))
    out = write_summary("self_rewarding", sr)
    assert [(r["iteration"], r["reward_mean"], r["judge_score_mean"]) for r in out["iterations"]] == [
        (0, -0.2, 2.0), (1, 0.1, 2.5), (2, 0.3, 3.0)]
    assert out["reward_gain"] == pytest.approx(0.5) and out["met"] == {}



def test_end_strings_stop_greedy_responses_and_are_scored_closed_by_eos_as_rm_data(eval_setup, tiny_model_dir):
    """``end_strings``: a response stops at the string and is scored without its tokens, closed by EOS (the
    plain-text reward-model data), as PPO scores such a rollout; the response itself keeps them."""
    from nemo_aligner.data.prompts import end_string_close
    from nemo_aligner.models.reward_model import RewardScorer

    root, prompts, rm, _ = eval_setup
    free, stopped = root / "free.jsonl", root / "stopped.jsonl"
    evaluate_policy(str(tiny_model_dir), str(prompts), str(rm), num_prompts=2, max_new_tokens=8, batch_size=2,
                    samples_file=str(free))
    first = json.loads(free.read_text().splitlines()[0])
    scorer = RewardScorer.from_pretrained(str(rm))
    tok = scorer.tokenizer
    end = next(tok.decode(first["response_ids"][1:k]) for k in range(2, 9) if tok.decode(first["response_ids"][1:k]).strip())
    out = evaluate_policy(str(tiny_model_dir), str(prompts), str(rm), num_prompts=2, max_new_tokens=8, batch_size=2,
                          samples_file=str(stopped), end_strings=[end])
    assert out["end_strings"] == [end]
    row = json.loads(stopped.read_text().splitlines()[0])
    assert tok.decode(row["response_ids"]).endswith(end) and len(row["response_ids"]) < len(first["response_ids"])
    closed = end_string_close(tok, [end]).strip(row["response_ids"]) + [tok.eos_token_id]
    assert closed[0] == first["response_ids"][0]  # the text before the end string is kept
    assert row["reward"] == pytest.approx(scorer.score([row["prompt_ids"] + closed])[0], abs=1e-5)
    assert row["reward"] != pytest.approx(scorer.score([row["prompt_ids"] + row["response_ids"]])[0], abs=1e-6)
