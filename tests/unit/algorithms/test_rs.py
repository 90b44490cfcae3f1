"""Rejection sampling: top-n selection and the training batch on known scores, the trainer's wiring through the
alignable interface (a fake policy), and end-to-end runs on a tiny Llama (learning signal, resume, reward sources)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    EnginePolicy,
    FakePolicy,
    compose_config,
    load_example_script,
    step_responses_by_global_index,
    write_prompts,
)
from nemo_aligner.algorithms.base import RunContext
from nemo_aligner.algorithms.online import RolloutSetup
from nemo_aligner.algorithms.rs import (
    RSConfig,
    RSTrainer,
    build_rs_training_batch,
    compute_rs_max_steps,
    rs_rollout_metrics,
    select_top_n,
)
from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.generation import GenerationOutput, LengthParams, SamplingParams
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.utils.config import ConfigKeyError


# ---------------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------------
def test_select_top_n_known_scores_and_ties():
    rewards = torch.tensor([
        [0.1, 0.9, 0.5, 0.9],                   # tie at the top: sample 1 (drawn first) before sample 3
        [3.0, -1.0, 2.0, 0.0],
        [-math.inf, -math.inf, 0.0, -math.inf],  # -inf ties: lowest index first
        [0.5, 0.5, 0.5, 0.5],                   # all equal: sample order
    ])
    assert select_top_n(rewards, 1).tolist() == [[1], [0], [2], [0]]
    assert select_top_n(rewards, 2).tolist() == [[1, 3], [0, 2], [2, 0], [0, 1]]
    assert select_top_n(rewards, 4).tolist() == [[1, 3, 2, 0], [0, 2, 3, 1], [2, 0, 1, 3], [0, 1, 2, 3]]
    assert select_top_n([[1.0, 2.0], [5.0, 4.0]], 1).tolist() == [[1], [0]]  # nested lists work too
    out = select_top_n(rewards, 2)
    assert out.dtype == torch.long and out.shape == (4, 2)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="top_n"):
            select_top_n(rewards, bad)
    with pytest.raises(ValueError, match="NaN"):
        select_top_n(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="shape"):
        select_top_n(torch.tensor([0.0, 1.0]), 1)


def test_training_batch_masks_the_prompt():
    kept = Rollouts.from_lists([[5, 6, 7], [8, 9]], [[40, 41], [50]])
    batch = build_rs_training_batch(kept, pad_token_id=0)
    assert batch.targets.tolist() == [40, 41, 50]  # only response tokens are targets
    assert batch.seq_id.tolist() == [0, 0, 1]
    assert batch.target_lengths.tolist() == [2, 1]
    # the hidden state predicting response token t sits at position t - 1 (the last prompt token predicts the first)
    assert list(zip(batch.pred_row.tolist(), batch.pred_col.tolist())) == [(0, 2), (0, 3), (1, 1)]
    assert batch.input_ids.tolist() == [[5, 6, 7, 40, 41], [8, 9, 50, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    packed = build_rs_training_batch(kept, pad_token_id=0, pack=True, max_row_length=8)
    assert packed.targets.tolist() == [40, 41, 50] and packed.num_sequences == 2


def test_rollout_metrics_by_hand():
    rewards = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 6.0]])
    lengths = torch.tensor([[2, 4, 6], [1, 1, 10]])
    kept = select_top_n(rewards, 1)  # [[1], [2]]
    m = rs_rollout_metrics(rewards, lengths, kept)
    assert m["rewards_all_mean"] == pytest.approx(2.0)
    assert m["rewards_kept_mean"] == pytest.approx(4.5)   # (3 + 6) / 2
    assert m["rewards_best_mean"] == pytest.approx(4.5)
    assert m["reward_spread_mean"] == pytest.approx(4.0)  # ((3 - 1) + (6 - 0)) / 2
    assert m["reward_std_per_prompt_mean"] == pytest.approx((1.0 + math.sqrt(12.0)) / 2)
    assert m["response_lengths_all_mean"] == pytest.approx(4.0)
    assert m["response_lengths_kept_mean"] == pytest.approx(7.0)  # (4 + 10) / 2


def test_config_checks_and_max_steps():
    cfg = RSConfig(num_rollout_samples=4, num_rollouts_per_prompt=3, top_n_rollouts=2, global_batch_size=3,
                   micro_batch_size=1)
    cfg.check()
    assert cfg.kept_per_step == 8 and cfg.optimizer_steps_per_rs_step() == 3  # ceil(8 / 3)
    assert compute_rs_max_steps(10, cfg) == 2  # 10 // 4 prompts per step, one epoch
    with pytest.raises(ValueError, match="nothing to train"):
        compute_rs_max_steps(3, cfg)
    with pytest.raises(ValueError, match="top_n_rollouts"):
        RSConfig(num_rollouts_per_prompt=2, top_n_rollouts=3).check()
    with pytest.raises(ValueError, match="global_batch_size"):
        RSConfig(global_batch_size=6, micro_batch_size=4).check()
    with pytest.raises(ValueError, match="data-parallel"):
        RSConfig(num_rollout_samples=3).check(data_parallel_size=2)


# ---------------------------------------------------------------------------------------------------------------
# the trainer's wiring, with a fake policy that records every call
# ---------------------------------------------------------------------------------------------------------------
def test_train_step_keeps_the_best_and_trains_on_them_in_configured_batches(tmp_path):
    policy = FakePolicy()
    cfg = RSConfig(num_rollout_samples=4, num_rollouts_per_prompt=3, top_n_rollouts=2, rollout_micro_batch_size=5,
                   forward_micro_batch_size=4, global_batch_size=4, micro_batch_size=2, max_steps=1)
    prompts = [[1, 100 + i, 101 + i] for i in range(8)]
    reward_calls = []

    def reward_fn(prompt_ids, response_ids):  # reward = the response token id, so the ranking is known
        reward_calls.append(len(response_ids))
        return [float(r[0]) for r in response_ids]

    trainer = RSTrainer(policy, reward_fn, RolloutSetup(prompts, [], SamplingParams(), LengthParams(max_length=4)),
                        cfg, RunContext(tmp_path, CheckpointManager(tmp_path / "ckpt"), export_hf=False))
    metrics, kept = trainer.train_step()

    # 4 prompts x 3 responses = 12 rows, generated in calls of 5, scored in calls of 4
    assert [c for c in policy.calls if c[0] == "generate"] == [("generate", 5, False)] * 2 + [("generate", 2, False)]
    assert reward_calls == [4, 4, 4]
    # kept: per prompt, the two highest rewards (ties: the earlier sample), best first
    indices = [i for mb in trainer.sampler.micro_batches(0) for i in mb]
    rollouts = trainer.generate_rollouts([prompts[i] for i in indices], 3, SamplingParams(), 5, trainer._step_seed(0),
                                         prompt_indices=indices)
    responses, sequences = rollouts.responses(), rollouts.sequences()
    expected = []
    for p in range(4):
        ranked = sorted(range(3), key=lambda j: (-responses[3 * p + j][0], j))[:2]
        expected += [sequences[3 * p + j] for j in ranked]
    assert kept.sequences() == expected
    assert all(prompt == prompts[indices[k // 2]] for k, prompt in enumerate(kept.prompts()))
    assert kept.prompt_index.tolist() == [k // 2 for k in range(8)]
    all_rewards = [r[0] for r in responses]
    assert metrics["rewards_all_mean"] == pytest.approx(sum(all_rewards) / 12)
    assert metrics["rewards_kept_mean"] == pytest.approx(sum(r[0] for r in kept.responses()) / 8)
    assert kept.rewards.tolist() == [float(r[0]) for r in kept.responses()]
    assert metrics["rewards_kept_mean"] > metrics["rewards_all_mean"]

    # 8 kept rollouts, global batch 4, micro batch 2: 2 optimizer steps of 2 micro-batches each
    training = [c for c in policy.calls if c[0] in ("prepare", "accumulate", "finish")]
    assert training == [("prepare",), ("accumulate", False), ("accumulate", True), ("finish",)] * 2
    assert metrics["optimizer_steps"] == 2 and trainer.optimizer_step == 2
    # every kept rollout is trained on exactly once, with only its response tokens as targets
    seen = sorted(tuple(row[: n].tolist()) for b in policy.batches for row, n in zip(b.input_ids, b.seq_lengths))
    assert seen == sorted(tuple(ids) for ids in expected)
    responses = sorted(kept.response_ids.tolist())
    assert sorted(t for b in policy.batches for t in b.targets.tolist()) == responses
    # loss = token-mean NLL (1.0 here) divided by the micro-batches of the step
    assert policy.losses == [pytest.approx(0.5)] * 4
    assert metrics["loss"] == pytest.approx(1.0)


def test_validation_is_greedy_and_writes_a_sample_table(tmp_path):
    policy = FakePolicy()
    cfg = RSConfig(num_rollout_samples=2, num_rollouts_per_prompt=2, num_val_samples=3, val_rollout_micro_batch_size=2,
                   num_val_samples_to_show=2, global_batch_size=2)
    setup = RolloutSetup([[1, 2]] * 4, [[1, 3], [1, 4], [1, 5], [1, 6]], SamplingParams(), LengthParams(max_length=4))
    tables = []
    trainer = RSTrainer(policy, lambda p, r: [float(len(x)) for x in r], setup, cfg,
                        RunContext(tmp_path, CheckpointManager(tmp_path / "c"),
                                   log_table=lambda *table: tables.append(table)))
    val = trainer.validate()
    assert [c for c in policy.calls if c[0] == "generate"] == [("generate", 2, True), ("generate", 1, True)]
    assert val["global_rewards"] == pytest.approx((1 + 2 + 1) / 3)  # lengths 1, 2 (call 1) and 1 (call 2)
    assert val["global_response_lengths_mean"] == pytest.approx(4 / 3)
    table = (tmp_path / "val_samples" / "step=0000000.md").read_text()
    assert table.count("\n| ") == 3  # header + 2 rows
    # the same rows go to the table sink (W&B when enabled): the first 2 scored rollouts
    [(key, columns, rows, step)] = tables
    assert (key, columns, step) == ("val/samples", ["prompt", "response", "reward"], 0)
    assert [row[2] for row in rows] == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------------------------
# end to end on a tiny Llama
# ---------------------------------------------------------------------------------------------------------------
def token_fraction_reward(target_ids):
    """Programmatic reward: the fraction of response tokens whose id is in ``target_ids``."""
    targets = set(target_ids)
    return lambda prompt_ids, response_ids: [sum(t in targets for t in r) / len(r) for r in response_ids]


def rs_cfg(tmp_path, model_dir, prompts, *overrides, run="run"):
    return compose_config("gpt_rs_actor", [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        "reward_model.restore_from_path=null",
        f"model.data.data_prefix.train=[{prompts}]",
        f"model.data.data_prefix.validation=[{prompts}]",
        f"exp_manager.explicit_log_dir={tmp_path / run}",
        "trainer.accelerator=cpu",
        "model.encoder_seq_length=64",
        "model.rs.length_params.max_length=6",
        "model.rs.num_rollout_samples=8",
        "model.rs.num_rollouts_per_prompt=4",
        "model.rs.rollout_micro_batch_size=32",
        "model.rs.num_val_samples=16",
        "model.global_batch_size=8",
        "model.micro_batch_size=8",
        "trainer.rs.max_epochs=100",
        "model.optim.lr=3e-3",
        "model.optim.sched.min_lr=3e-3",
        "model.optim.weight_decay=0",
        *overrides,
    ])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread (no oversubscription when other jobs share the CPU); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rs_script():
    return load_example_script("train_gpt_rs_actor")


def test_rs_raises_greedy_reward_of_a_tiny_model(tmp_path, tiny_model_dir, rs_script):
    """Reward = fraction of response tokens with ids in [3, 80) (about a quarter of the vocabulary)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = rs_cfg(tmp_path, tiny_model_dir, prompts, "trainer.rs.max_steps=8", "trainer.rs.val_check_interval=8",
                 "trainer.rs.save_interval=4")
    out = rs_script.run(cfg, reward_fn=token_fraction_reward(range(3, 80)))
    before, after = out["initial_val"]["global_rewards"], out["val"]["global_rewards"]
    assert after > before + 0.3, (before, after)  # measured: 0.41 -> 1.0
    history = out["history"]
    assert len(history) == 8
    assert all(m["rewards_kept_mean"] >= m["rewards_all_mean"] for m in history)
    assert all(m["optimizer_steps"] == 1 for m in history)  # 8 kept rollouts per step, global batch 8
    run = Path(out["log_dir"])
    assert (run / "checkpoints" / "step=0000008" / "state.pt").is_file()
    meta = json.loads((run / "checkpoints" / "step=0000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["optimizer_step"] == 8 and meta["consumed_samples"] == 64
    assert meta["metrics"]["val_global_rewards"] == pytest.approx(after)
    assert (run / "hf_export" / "model.safetensors").is_file()
    assert "| reward |" in (run / "val_samples" / "step=0000008.md").read_text()
    assert (run / "csv" / "metrics.csv").is_file()


def test_resume_continues_exactly(tmp_path, tiny_model_dir, rs_script):
    """3 uninterrupted steps == 2 steps, stop, resume for the 3rd (policy, optimizer, RNG and data position)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["trainer.rs.val_check_interval=0", "trainer.rs.save_interval=1", "exp_manager.export_hf=false",
              "model.rs.num_rollout_samples=4", "model.rs.num_rollouts_per_prompt=2", "model.rs.num_val_samples=2",
              "model.global_batch_size=2", "model.micro_batch_size=1", "model.rs.length_params.max_length=4"]
    reward = token_fraction_reward(range(3, 80))
    full = rs_script.run(rs_cfg(tmp_path, tiny_model_dir, prompts, *common, "trainer.rs.max_steps=3", run="full"),
                         reward_fn=reward)
    rs_script.run(rs_cfg(tmp_path, tiny_model_dir, prompts, *common, "trainer.rs.max_steps=2", run="split"),
                  reward_fn=reward)
    resumed = rs_script.run(rs_cfg(tmp_path, tiny_model_dir, prompts, *common, "trainer.rs.max_steps=3", run="split"),
                            reward_fn=reward)
    assert len(resumed["history"]) == 1 and resumed["trainer"].optimizer_step == 6
    for key in ("rewards_all_mean", "rewards_kept_mean", "loss", "response_lengths_all_mean"):
        assert resumed["history"][0][key] == pytest.approx(full["history"][2][key], abs=1e-5), key
    assert resumed["val"]["global_rewards"] == pytest.approx(full["val"]["global_rewards"], abs=1e-6)
    with pytest.raises(FileExistsError):
        rs_script.run(rs_cfg(tmp_path, tiny_model_dir, prompts, *common, "exp_manager.resume_if_exists=false",
                             run="split"), reward_fn=reward)


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_labels=1,
    )
    model = LlamaForSequenceClassification(cfg)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("tiny_rs_rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_local_and_remote_reward_models_agree(tmp_path, tiny_model_dir, tiny_rm_dir, rs_script, monkeypatch):
    """One RS step scored by a local tiny RM, then by the same RM behind the HTTP server: same numbers."""
    from nemo_aligner.models.reward_model import RewardScorer
    from nemo_aligner.servers.app import API_TOKEN_ENV, BackgroundServer
    from nemo_aligner.servers.reward_model_server import build_reward_model_app

    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    common = ["trainer.rs.max_steps=1", "trainer.rs.val_check_interval=0", "exp_manager.export_hf=false",
              "model.rs.num_rollout_samples=2", "model.rs.num_rollouts_per_prompt=3", "model.rs.top_n_rollouts=2",
              "model.rs.num_val_samples=2", "model.global_batch_size=4", "model.micro_batch_size=2",
              "model.rs.forward_micro_batch_size=4"]
    local = rs_script.run(rs_cfg(tmp_path, tiny_model_dir, prompts, *common,
                                 f"reward_model.restore_from_path={tiny_rm_dir}", run="local"))
    app = build_reward_model_app(RewardScorer.from_pretrained(str(tiny_rm_dir)), micro_batch_size=4)
    with BackgroundServer(app) as url:
        port = int(url.rsplit(":", 1)[1])
        remote = rs_script.run(rs_cfg(tmp_path, tiny_model_dir, prompts, *common, "remote_rm.enable=true",
                                      f"remote_rm.reward_model.port={port}", "remote_rm.timeout=30", run="remote"))
    a, b = local["history"][0], remote["history"][0]
    assert a["reward_spread_mean"] > 0  # the RM separates the samples
    for key in ("rewards_all_mean", "rewards_kept_mean", "reward_spread_mean", "loss"):
        assert b[key] == pytest.approx(a[key], abs=1e-4), key
    assert remote["val"]["global_rewards"] == pytest.approx(local["val"]["global_rewards"], abs=1e-4)


def test_user_errors(tmp_path, tiny_model_dir, rs_script):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    bad = compose_config("gpt_rs_actor", ["++model.rs.top_n_rollout=2"])
    with pytest.raises(ConfigKeyError, match="did you mean 'model.rs.top_n_rollouts'"):
        rs_script.run(bad)
    with pytest.raises(ValueError, match="top_n_rollouts"):
        rs_script.run(rs_cfg(tmp_path, tiny_model_dir, prompts, "model.rs.top_n_rollouts=5"))
    with pytest.raises(FileNotFoundError, match="reward_model.restore_from_path"):
        rs_script.run(rs_cfg(tmp_path, tiny_model_dir, prompts, "model.rs.num_rollout_samples=2", run="norm"))


@pytest.mark.slow
def test_smollm2_rs_two_steps_with_the_rm_export(tmp_path, smollm2_rm_export):
    """Two RS steps of SmolLM2-135M-Instruct against a SmolLM2 RM export (the quick start's, or the fixture's)."""
    export = smollm2_rm_export
    data = REPO.parent / "shared" / "data" / "hh-rlhf"
    script = load_example_script("train_gpt_rs_actor")
    cfg = compose_config("gpt_rs_actor", [
        f"reward_model.restore_from_path={export}",
        f"model.data.data_prefix.train=[{data / 'train.jsonl.gz'}]",
        f"model.data.data_prefix.validation=[{data / 'validation.jsonl.gz'}]",
        "model.data.max_prompts=8", "model.data.max_val_prompts=2", "trainer.accelerator=cpu",
        "trainer.rs.max_steps=2", "model.rs.num_rollout_samples=2", "model.rs.num_rollouts_per_prompt=2",
        "model.rs.rollout_micro_batch_size=4", "model.rs.num_val_samples=2", "model.global_batch_size=2",
        "model.rs.length_params.max_length=16", "model.encoder_seq_length=512", "exp_manager.export_hf=false",
        f"exp_manager.explicit_log_dir={tmp_path / 'rs'}",
    ])
    out = script.run(cfg)
    assert len(out["history"]) == 2
    assert all(m["rewards_kept_mean"] >= m["rewards_all_mean"] for m in out["history"])
    assert math.isfinite(out["val"]["global_rewards"])


# ---------------------------------------------------------------------------------------------------------------
# data-parallel seeding: a response depends on its global prompt index and sample index, not on the rank
# ---------------------------------------------------------------------------------------------------------------
def test_rs_rollouts_differ_across_ranks_and_match_a_one_rank_run(tmp_path, tokenizer):
    """Every prompt is the same text, so only the random numbers tell the responses apart. On 2 simulated ranks,
    the ranks' responses differ (with one seed per generation call, whatever the rank, they were identical); and
    each (global prompt, sample) gets the same response as in a 1-rank run with other generation micro-batches."""
    from tests.helpers import build_tiny_model

    lm = build_tiny_model("llama", len(tokenizer), seed=4).eval()
    prompt = tokenizer("Human: What is two plus two? Assistant:", add_special_tokens=False)["input_ids"]
    prompts = [prompt] * 16
    sampling, lengths = SamplingParams(temperature=1.0), LengthParams(max_length=8)

    def run(rank: int, world_size: int, rollout_micro_batch_size: int):
        policy = EnginePolicy(lm, rank, world_size)
        cfg = RSConfig(num_rollout_samples=4, num_rollouts_per_prompt=2, top_n_rollouts=1,
                       rollout_micro_batch_size=rollout_micro_batch_size, global_batch_size=2, micro_batch_size=1,
                       max_steps=1)
        run_dir = tmp_path / f"{rank}-{world_size}"
        trainer = RSTrainer(policy, lambda p, r: [float(len(x)) for x in r],
                            RolloutSetup(prompts, [], sampling, lengths), cfg, RunContext(run_dir, CheckpointManager(run_dir / "ckpt"), export_hf=False))
        trainer.train_step()
        return step_responses_by_global_index(policy, trainer, 2)

    rank0, rank1 = run(0, 2, 1), run(1, 2, 1)
    assert not rank0.keys() & rank1.keys() and len(rank0) == len(rank1) == 4  # 2 prompts x 2 samples each
    # (a) different random numbers on the two ranks: no response of rank 0 equals the same-position one of rank 1
    assert all(a != b for a, b in zip(rank0.values(), rank1.values())), (rank0, rank1)
    assert len({tuple(r) for r in [*rank0.values(), *rank1.values()]}) == 8  # and the samples of a prompt differ
    # (b) the same responses as one rank generating all 4 prompts in calls of 3 responses
    assert run(0, 1, 3) == {**rank0, **rank1}


# ---------------------------------------------------------------------------------------------------------------
# the scored sequence of a chat rollout (the reward model's read position)
# ---------------------------------------------------------------------------------------------------------------
def test_rs_scores_ended_chat_rollouts_with_the_end_of_turn_suffix(tmp_path):
    """A ChatML policy (tiny tokenizer; SmolLM2's layout): reward-model data ends a chat response with
    ``<|im_end|>\\n`` and the RM reads at the ``\\n``. Rollouts that stopped at ``<|im_end|>`` reach the reward
    function with the ``\\n`` appended -- in training steps and in validation -- so the RM sees exactly its
    training tokens; rollouts cut at max_length are scored as they are; what the policy trains on is unchanged."""
    from tests.helpers import build_chatml_tokenizer

    from nemo_aligner.data.prompts import tokenize_prompt
    from nemo_aligner.data.chat import tokenize_prompt_response

    tokenizer = build_chatml_tokenizer()
    eos, newline = tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    prompt = tokenize_prompt(messages, tokenizer)
    rm_prompt, rm_response = tokenize_prompt_response(messages, "Mix flour and water.", tokenizer)
    content = rm_response[: -1 - len(newline)]

    class ChatPolicy(FakePolicy):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer

        def generate(self, prompt_ids, sampling_params, length_params, seed=None, **kwargs):
            # even rows stop at <|im_end|>, odd rows are cut at max_length
            rows = range(len(prompt_ids))
            return GenerationOutput([content + [eos] if j % 2 == 0 else content[:3] for j in rows],
                                    [j % 2 == 0 for j in rows])

    seen = []

    def reward_fn(prompt_ids, response_ids):
        seen.extend(list(p) + list(r) for p, r in zip(prompt_ids, response_ids))
        return [float(len(r)) for r in response_ids]

    policy = ChatPolicy()
    cfg = RSConfig(num_rollout_samples=2, num_rollouts_per_prompt=2, top_n_rollouts=1, rollout_micro_batch_size=4,
                   forward_micro_batch_size=4, global_batch_size=2, micro_batch_size=1, max_steps=1,
                   num_val_samples=2, val_rollout_micro_batch_size=2)
    setup = RolloutSetup([prompt] * 4, [prompt] * 2, SamplingParams(), LengthParams(max_length=len(content) + 1))
    trainer = RSTrainer(policy, reward_fn, setup, cfg,
                        RunContext(tmp_path, CheckpointManager(tmp_path / "ckpt"), export_hf=False))
    assert prompt == rm_prompt and trainer.end_of_turn is not None
    _, kept = trainer.train_step()
    assert seen == [rm_prompt + rm_response, prompt + content[:3]] * 2
    # the ended response (longer once scored) is kept and trained on as generated: it ends at <|im_end|>
    assert kept.responses() == [content + [eos]] * 2 and kept.ended.tolist() == [True, True]
    seen.clear()
    trainer.validate()
    assert seen == [rm_prompt + rm_response, prompt + content[:3]]
