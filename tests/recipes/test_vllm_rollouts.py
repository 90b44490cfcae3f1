"""The recipes that generate (PPO, rejection sampling, generate.py) with ``trainer.<algo>.vllm.enable=true``, on the
session's one tiny head_dim-64 Llama engine: the runs train, log the refit time and the engine/trainer log-prob
mismatch, and after training the engine answers exactly like the trained policy's native greedy decoding (the
refit happened)."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_aligner.generation import LengthParams, SamplingParams
from tests.helpers import (
    compose_config,
    engine_and_native_greedy,
    load_example_script,
    ppo_cfg,
    vllm_overrides,
    write_prompts,
)

pytestmark = pytest.mark.vllm
GREEDY = SamplingParams(use_greedy=True)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fraction_reward(targets):
    targets = set(targets)
    return lambda prompt_ids, response_ids: [sum(t in targets for t in r) / len(r) for r in response_ids]



def test_ppo_with_vllm_refits_after_each_step(tmp_path, vllm_model_dir):
    """Two PPO steps (one actor optimizer step each) with vLLM rollouts; then vLLM's greedy output equals the
    trained actor's native greedy output, and differs from the untrained model's."""
    prompts_file = write_prompts(tmp_path / "prompts.jsonl")
    cfg = ppo_cfg(tmp_path, vllm_model_dir, prompts_file, *vllm_overrides("ppo"), "trainer.ppo.max_steps=2",
                  "trainer.ppo.val_check_interval=0", "model.optim.lr=5e-2", "model.optim.sched.min_lr=5e-2",
                  "model.ppo.mask_truncated=false")
    out = load_example_script("train_gpt_ppo_actor").run(cfg, reward_fn=fraction_reward(range(3, 80)))
    history = out["history"]
    assert len(history) == 2
    for metrics in history:
        assert metrics["time_refit"] > 0  # step 1: the initial weights, step 2: after step 1's update
        assert 0 <= metrics["rollout_logprob_mismatch"] < 1e-3, metrics  # float32 engine and trainer
    actor = out["trainer"].actor
    assert actor.rollout_engine is not None and actor.weights_version == 2
    tok = actor.tokenizer
    prompts = [tok(f"Human: Tell me about owls {i}. Assistant:")["input_ids"] for i in range(4)]
    engine_out, native_out = engine_and_native_greedy(actor, prompts, LengthParams(max_length=12))
    assert engine_out.response_ids == native_out.response_ids
    from transformers import AutoModelForCausalLM

    from nemo_aligner.generation import generate

    untrained = AutoModelForCausalLM.from_pretrained(vllm_model_dir).eval()
    before = generate(untrained, prompts, GREEDY, LengthParams(max_length=12), actor.eos_token_ids(), actor.pad_token_id)
    assert before.response_ids != engine_out.response_ids  # the two steps changed the policy


def test_rs_with_vllm_trains_and_refits(tmp_path, vllm_model_dir):
    prompts_file = write_prompts(tmp_path / "prompts.jsonl")
    cfg = compose_config("gpt_rs_actor", [
        f"pretrained_checkpoint.restore_from_path={vllm_model_dir}", "reward_model.restore_from_path=null",
        f"model.data.data_prefix.train=[{prompts_file}]", f"model.data.data_prefix.validation=[{prompts_file}]",
        f"exp_manager.explicit_log_dir={tmp_path / 'rs'}", "trainer.accelerator=cpu", "model.encoder_seq_length=64",
        "model.rs.length_params.max_length=6", "model.rs.num_rollout_samples=8", "model.rs.num_rollouts_per_prompt=4",
        "model.rs.rollout_micro_batch_size=32", "model.rs.num_val_samples=8", "model.global_batch_size=8",
        "model.micro_batch_size=8", "trainer.rs.max_steps=2", "trainer.rs.val_check_interval=2",
        "model.optim.lr=3e-2", "model.optim.sched.min_lr=3e-2", *vllm_overrides("rs"),
    ])
    out = load_example_script("train_gpt_rs_actor").run(cfg, reward_fn=fraction_reward(range(3, 80)))
    assert len(out["history"]) == 2 and all(m["time_refit"] > 0 for m in out["history"])
    policy = out["trainer"].policy
    tok = policy.tokenizer
    prompts = [tok(f"Human: Tell me about jazz {i}. Assistant:")["input_ids"] for i in range(4)]
    engine_out, native_out = engine_and_native_greedy(policy, prompts, LengthParams(max_length=10))
    assert engine_out.response_ids == native_out.response_ids
    assert "global_rewards" in out["val"]


def test_generate_script_with_vllm_matches_native_greedy(tmp_path, vllm_model_dir):
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(5):
            f.write(json.dumps({"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}", "rejected": "x"}) + "\n")
    script = load_example_script("generate")
    outputs = {}
    for name, extra in (("native", []), ("vllm", vllm_overrides("generation"))):
        output = tmp_path / f"{name}.jsonl"
        cfg = compose_config("generation", [
            f"pretrained_checkpoint.restore_from_path={vllm_model_dir}", f"data.prompt_file={path}",
            f"generation.output_file={output}", "trainer.accelerator=cpu", "model.micro_batch_size=4",
            "generation.length_params.max_length=8", "generation.sampling_params.use_greedy=true", *extra,
        ])
        assert script.run(cfg)["generated"] == 5
        outputs[name] = [json.loads(line) for line in open(output)]
    assert [r["responses"] for r in outputs["vllm"]] == [r["responses"] for r in outputs["native"]]
    assert any(r["responses"][0] for r in outputs["native"])


class _Killed(Exception):
    pass


def test_ppo_with_vllm_kill_and_resume_matches_uninterrupted_run(tmp_path, vllm_model_dir, monkeypatch):
    """3 PPO steps with vLLM rollouts in one go vs. 2 steps, a crash after the step-2 checkpoint, and a resume: the
    same sampled rollouts and metrics. The resumed actor refits the shared engine with the checkpoint's weights
    (the engine last held the killed run's weights)."""
    from nemo_aligner.algorithms.ppo import PPOTrainer

    script = load_example_script("train_gpt_ppo_actor")
    prompts_file = write_prompts(tmp_path / "prompts.jsonl")
    overrides = [*vllm_overrides("ppo"), "trainer.ppo.max_epochs=10", "trainer.ppo.max_steps=3", "trainer.ppo.save_interval=2",
                 "trainer.ppo.val_check_interval=0", "model.optim.lr=1e-2", "model.optim.sched.min_lr=1e-3",
                 "model.ppo.mask_truncated=false", "exp_manager.export_hf=false"]
    reward = fraction_reward(range(3, 80))
    straight = script.run(ppo_cfg(tmp_path, vllm_model_dir, prompts_file, *overrides, run="straight"), reward_fn=reward)
    original_save, before_kill = PPOTrainer._save, []

    def save_then_die(self):
        original_save(self)
        if self.step == 2:
            before_kill.extend(self.history)
            raise _Killed

    monkeypatch.setattr(PPOTrainer, "_save", save_then_die)
    cfg = ppo_cfg(tmp_path, vllm_model_dir, prompts_file, *overrides, run="resumed")
    with pytest.raises(_Killed):
        script.run(cfg, reward_fn=reward)
    monkeypatch.setattr(PPOTrainer, "_save", original_save)
    resumed = script.run(cfg, reward_fn=reward)
    history = before_kill + resumed["history"]
    assert len(history) == len(straight["history"]) == 3
    for step, (a, b) in enumerate(zip(straight["history"], history), start=1):
        for key in ("rewards_mean", "response_lengths_mean", "init_policy_kl", "policy_loss", "value_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.vllm
def test_eval_policy_on_vllm_gives_the_native_greedy_responses_and_numbers(tmp_path, vllm_model_dir, tokenizer):
    """``eval_policy`` (``recipes/evaluate.py``) with ``engine="vllm"``: the same greedy responses, rewards, lengths,
    distinct-n and KL as the native engine. Here, not in test_evaluation.py: this module runs after the Ray modules,
    whose ``ray.shutdown()`` must come before any vLLM engine starts in the session (see ``ray_cluster``)."""
    from nemo_aligner.recipes.evaluate import evaluate_policy
    from tests.helpers.models import save_tiny_reward_model

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in
                               ["How do I bake bread?", "What is two plus two?", "Tell me something rude."]))
    rm = save_tiny_reward_model(tmp_path / "rm", vllm_model_dir, tokenizer)
    runs = {}
    for engine in ("native", "vllm"):
        samples = tmp_path / f"{engine}.jsonl"
        runs[engine] = evaluate_policy(str(vllm_model_dir), str(prompts), str(rm), reference=str(vllm_model_dir),
                                       num_prompts=3, max_new_tokens=8, engine=engine, samples_file=str(samples))
        runs[engine]["ids"] = [json.loads(line)["response_ids"] for line in samples.read_text().splitlines()]
    assert runs["vllm"]["ids"] == runs["native"]["ids"]
    for key in ("reward_mean", "length_mean", "distinct_2", "kl_mean"):
        assert runs["vllm"][key] == pytest.approx(runs["native"][key], abs=1e-5)
    with pytest.raises(ValueError, match="engine"):
        evaluate_policy(str(vllm_model_dir), str(prompts), str(rm), engine="tensorrt")
    _check_judge_scores(tmp_path, vllm_model_dir, tokenizer, prompts, rm)
    # stop the module's engines (this is its last test): each holds $VLLM_CPU_KVCACHE_SPACE GiB of KV cache
    from nemo_aligner.generation.vllm_engine import shutdown_engines

    shutdown_engines()


TEMPLATE = "Rate the answer from 0 to 5.\nQuestion: {{ prompt }}\nAnswer: {{ response }}\nEnd with Score: <points>"


def _check_judge_scores(tmp_path, model_dir, tokenizer, prompts, rm):
    """``evaluate_policy(judge=...)``: each response's judge score is the judge's most likely score string after its
    request, greedy justification and ``"Score: "`` (what the trainer's native constrained judge picks, here from
    vLLM's structured outputs), the judge sees the prompt and the response, and ``"self"`` equals the same weights
    refit from a directory. A judge needs the vLLM engine."""
    from transformers import AutoModelForCausalLM

    from nemo_aligner.algorithms.llm_judge import fit_judge_request, judge_request_ids
    from nemo_aligner.data.chat import encode
    from nemo_aligner.recipes.evaluate import evaluate_policy

    runs = {}
    for judge in ("self", str(model_dir)):
        samples = tmp_path / f"judged_{len(runs)}.jsonl"
        runs[judge] = evaluate_policy(str(model_dir), str(prompts), str(rm), num_prompts=3, max_new_tokens=8,
                                      engine="vllm", samples_file=str(samples), judge=judge, judge_max_tokens=6,
                                      judge_template=TEMPLATE, judge_max_request_tokens=200)
        runs[judge]["rows"] = [json.loads(line) for line in samples.read_text().splitlines()]
    rows = runs["self"]["rows"]
    assert [r["judge_score"] for r in runs[str(model_dir)]["rows"]] == [r["judge_score"] for r in rows]
    assert runs["self"]["judge_score_mean"] == pytest.approx(sum(r["judge_score"] for r in rows) / 3)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    digits = [encode(tokenizer, str(s), add_special_tokens=False) for s in range(6)]
    assert all(len(d) == 1 for d in digits)
    questions = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    for question, row in zip(questions, rows):
        response = tokenizer.decode(row["response_ids"], skip_special_tokens=True)
        request = fit_judge_request(TEMPLATE, {"prompt": question, "response": response}, tokenizer, 200)
        assert question in request and response in request
        justification = row["judgement"][: row["judgement"].rindex("Score: ")]
        context = judge_request_ids(request, tokenizer) + encode(tokenizer, justification + "Score: ", False)
        with torch.no_grad():
            logits = lm(torch.tensor([context])).logits[0, -1]
        assert row["judge_score"] == float(int(logits[[d[0] for d in digits]].argmax()))
        assert row["judgement"].endswith(f"Score: {int(row['judge_score'])}")
    with pytest.raises(ValueError, match="vllm"):
        evaluate_policy(str(model_dir), str(prompts), str(rm), num_prompts=1, judge="self")
