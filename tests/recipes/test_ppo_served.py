"""Served PPO (critic, initial policy and reward model behind loopback HTTP servers) against colocated PPO."""

from pathlib import Path

import pytest
import torch

from nemo_aligner.servers.app import BackgroundServer
from nemo_aligner.servers.client import HTTPClient, ServerRequestError

from tests.helpers import (
    compose_config,
    csv_column,
    load_example_script,
    ppo_cfg,
    ppo_command,
    run_ppo_ranks,
    save_tiny_reward_model,
    write_prompts,
)

COMPARED = ["rewards_mean", "init_policy_kl", "advantages_mean", "returns_mean", "value_loss", "explained_variance",
            "policy_loss", "clip_fraction", "approx_kl", "entropy", "response_lengths_mean"]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """A tiny reward-model export: the tiny Llama as AutoModelForSequenceClassification(num_labels=1)."""
    return save_tiny_reward_model(tmp_path_factory.mktemp("tiny_rm"), tiny_model_dir, tokenizer)


def compose_cfg(name, *overrides):
    return compose_config(name, list(overrides))


def test_served_matches_colocated_first_step(tmp_path, tiny_model_dir, rm_dir):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["trainer.ppo.max_steps=1", "trainer.ppo.ppo_epochs=2", "model.global_batch_size=4",
              "model.optim.lr=1e-3", "critic.optim.lr=1e-3", "trainer.ppo.val_check_interval=0",
              f"reward_model.restore_from_path={rm_dir}", f"critic.restore_from_path={rm_dir}",
              "exp_manager.export_hf=false",
              "model.ppo.mask_truncated=false"]  # the tiny policy's 8-token responses are all truncated
    actor = load_example_script("train_gpt_ppo_actor")

    colocated = actor.run(ppo_cfg(tmp_path, tiny_model_dir, prompts, *common, run="colocated"))["history"][0]

    critic_script = load_example_script("serve_ppo_critic")
    policy_script = load_example_script("serve_initial_policy")
    rm_script = load_example_script("serve_reward_model")
    critic_app, _ = critic_script.build(compose_cfg(
        "gpt_ppo_critic", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={rm_dir}",
        "model.optim.lr=1e-3", "model.global_batch_size=4", "model.micro_batch_size=4", "trainer.ppo.ppo_epochs=2",
        "trainer.ppo.max_steps=4",  # the colocated critic's LR schedule: 1 PPO step x 2 epochs x 2 batches
        f"exp_manager.explicit_log_dir={tmp_path / 'critic'}", "exp_manager.export_hf=false"))
    policy_app, _ = policy_script.build(compose_cfg(
        "inference_initial_policy", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}"))
    rm_app, _ = rm_script.build(compose_cfg("inference_rm", "trainer.accelerator=cpu", f"rm_model_file={rm_dir}"))
    with BackgroundServer(critic_app) as critic_url, BackgroundServer(policy_app) as policy_url, \
            BackgroundServer(rm_app) as rm_url:
        port = lambda url: url.rsplit(":", 1)[1]  # noqa: E731
        served_out = actor.run(ppo_cfg(
            tmp_path, tiny_model_dir, prompts, *common, "remote_critic_rm.enable=true",
            f"remote_critic_rm.critic.port={port(critic_url)}",
            f"remote_critic_rm.initial_policy.port={port(policy_url)}",
            f"remote_critic_rm.reward_model.port={port(rm_url)}", run="served"))
        served = served_out["history"][0]
        # the critic checkpoint of the step was written by the server, beside nothing in the actor's run dir
        assert (tmp_path / "critic" / "checkpoints" / "step=0000001" / "state.pt").is_file()
        # a second fresh actor run against the same (already trained) server resets it first: the same numbers
        again = actor.run(ppo_cfg(
            tmp_path, tiny_model_dir, prompts, *common, "remote_critic_rm.enable=true",
            f"remote_critic_rm.critic.port={port(critic_url)}",
            f"remote_critic_rm.initial_policy.port={port(policy_url)}",
            f"remote_critic_rm.reward_model.port={port(rm_url)}", run="served_again"))["history"][0]
        with HTTPClient(critic_url, max_retries=0) as client:
            with pytest.raises(ServerRequestError) as err:
                client.post("/infer", {"token_ids": [[1, 2]], "prompt_lengths": [5]})
            assert err.value.status_code == 422
    assert colocated["clip_fraction"] > 0  # the second PPO epoch moves the ratio: the clipped loss is exercised
    for key in COMPARED:
        assert served[key] == pytest.approx(colocated[key], rel=1e-4, abs=1e-5), key
    for key in sorted(served):
        if not (key.startswith("time_") or key == "step_time"):
            assert again[key] == served[key], key


def test_served_kill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, rm_dir, monkeypatch):
    """Served mode: 4 steps straight vs. a run that crashes in step 3 after the critic server has already trained
    on step 3's rollouts, then resumes from the step-2 checkpoint (the still-running critic server is told to
    reload its step-2 checkpoint, undoing that update): the same per-step metrics and the same final actor and
    critic weights."""
    from nemo_aligner.algorithms.ppo import PPOTrainer
    from tests.helpers import LEARNING_OVERRIDES
    from tests.helpers import Killed as _Killed
    from tests.helpers import checkpoint_model_state as _state

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    actor = load_example_script("train_gpt_ppo_actor")
    critic_script = load_example_script("serve_ppo_critic")
    policy_app, _ = load_example_script("serve_initial_policy").build(compose_cfg(
        "inference_initial_policy", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}"))
    rm_app, _ = load_example_script("serve_reward_model").build(
        compose_cfg("inference_rm", "trainer.accelerator=cpu", f"rm_model_file={rm_dir}"))

    def critic_app(name):
        return critic_script.build(compose_cfg(
            "gpt_ppo_critic", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={rm_dir}",
            "model.optim.lr=1e-3", "model.optim.sched.min_lr=1e-4", "model.global_batch_size=8",
            "model.micro_batch_size=4", "trainer.ppo.ppo_epochs=2", "trainer.ppo.max_steps=8",
            f"exp_manager.explicit_log_dir={tmp_path / name}", "exp_manager.export_hf=false"))[0]

    def cfg(run, critic_url, policy_url, rm_url):
        port = lambda url: url.rsplit(":", 1)[1]  # noqa: E731
        return ppo_cfg(tmp_path, tiny_model_dir, prompts, *LEARNING_OVERRIDES, "trainer.ppo.max_steps=4",
                       "trainer.ppo.save_interval=2", "trainer.ppo.val_check_interval=2",
                       "model.optim.sched.min_lr=1e-3", "model.ppo.num_rollout_samples=8",
                       "exp_manager.export_hf=false", "remote_critic_rm.enable=true",
                       f"remote_critic_rm.critic.port={port(critic_url)}",
                       f"remote_critic_rm.initial_policy.port={port(policy_url)}",
                       f"remote_critic_rm.reward_model.port={port(rm_url)}", run=run)

    from nemo_aligner.servers.critic_server import RemoteCritic

    original_train_actor, before_kill = PPOTrainer.train_actor, []
    calls = []  # what the actor asks of the critic server at the start of each run
    original_reset, original_load = RemoteCritic.reset, RemoteCritic.load
    monkeypatch.setattr(RemoteCritic, "reset", lambda self: (calls.append("reset"), original_reset(self))[1])
    monkeypatch.setattr(RemoteCritic, "load", lambda self, step: (calls.append(f"load {step}"),
                                                                  original_load(self, step))[1])

    def die_in_step_3(self, rollouts, seed):  # the critic has trained on this step's rollouts already
        if self.step == 2:
            before_kill.extend(self.history)
            raise _Killed
        return original_train_actor(self, rollouts, seed)

    with BackgroundServer(policy_app) as policy_url, BackgroundServer(rm_app) as rm_url:
        with BackgroundServer(critic_app("critic_straight")) as critic_url:
            straight = actor.run(cfg("straight", critic_url, policy_url, rm_url))
        with BackgroundServer(critic_app("critic_resumed")) as critic_url:
            monkeypatch.setattr(PPOTrainer, "train_actor", die_in_step_3)
            calls.clear()
            with pytest.raises(_Killed):
                actor.run(cfg("resumed", critic_url, policy_url, rm_url))
            assert calls == ["reset"]  # a fresh run
            monkeypatch.setattr(PPOTrainer, "train_actor", original_train_actor)
            calls.clear()
            resumed = actor.run(cfg("resumed", critic_url, policy_url, rm_url))
            assert calls == ["load 2"]  # a resumed run loads the critic checkpoint of its step, no reset
    assert len(resumed["history"]) == 2
    history = before_kill + resumed["history"]
    for step, (a, b) in enumerate(zip(straight["history"], history), start=1):
        for key in sorted(a):
            if not (key.startswith("time_") or key == "step_time"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key)
    for a_dir, b_dir in [(Path(straight["log_dir"]) / "checkpoints", Path(resumed["log_dir"]) / "checkpoints"),
                         (tmp_path / "critic_straight" / "checkpoints", tmp_path / "critic_resumed" / "checkpoints")]:
        a, b = _state(a_dir / "step=0000004"), _state(b_dir / "step=0000004")
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name], b[name]), (a_dir, name)


def test_prompts_are_cut_to_fit_the_reward_model(tmp_path, tiny_model_dir, rm_dir):
    """An RM export with max_seq_length 12 and 8-token responses: the PPO actor keeps 4 prompt tokens (not
    encoder_seq_length - 8 = 56), so every prompt + response fits the reward model."""
    import json
    import shutil

    from nemo_aligner.models.reward_model import MAX_SEQ_LENGTH_KEY

    short_rm = tmp_path / "short_rm"
    shutil.copytree(rm_dir, short_rm)
    config = json.loads((short_rm / "config.json").read_text())
    config[MAX_SEQ_LENGTH_KEY] = 12
    (short_rm / "config.json").write_text(json.dumps(config))
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = load_example_script("train_gpt_ppo_actor").run(ppo_cfg(
        tmp_path, tiny_model_dir, prompts, "trainer.ppo.max_steps=1", "trainer.ppo.val_check_interval=0",
        f"reward_model.restore_from_path={short_rm}", f"critic.restore_from_path={rm_dir}",
        "exp_manager.export_hf=false"))
    trainer = out["trainer"]
    assert max(len(p) for p in trainer.train_prompts + trainer.val_prompts) == 4
    assert out["history"][0]["response_lengths_max"] <= 8


def _critic_server(tmp_path, rm_dir, name="critic"):
    return load_example_script("serve_ppo_critic").build(compose_cfg(
        "gpt_ppo_critic", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={rm_dir}",
        "model.optim.lr=1e-2", "model.global_batch_size=4", "model.micro_batch_size=4",
        f"exp_manager.explicit_log_dir={tmp_path / name}", "exp_manager.export_hf=false"))[0]


def _critic_rollouts(n=4):
    from nemo_aligner.data.rollouts import Rollouts

    return Rollouts.from_lists([[1, 5 + i] for i in range(n)], [[9, 12 + i, 7] for i in range(n)],
                               values=[[0.0, 0.1, 0.2]] * n, returns=[[1.0, 0.5, float(i)] for i in range(n)])


def test_critic_server_retry_cache_is_per_actor_run(tmp_path, rm_dir):
    """A retried /train of the same actor run is answered from the cache (no second update); a fresh actor run
    (a new RemoteCritic, as a new actor process makes) at the same step 0 is trained, not handed the cached
    metrics of the earlier run."""
    from nemo_aligner.servers.critic_server import RemoteCritic

    app = _critic_server(tmp_path, rm_dir)
    weights = lambda: [p.detach().clone() for p in app.state.critic.module.parameters()]  # noqa: E731
    with BackgroundServer(app) as url:
        first_run = RemoteCritic(url, max_retries=0)
        trained = first_run.train(_critic_rollouts(), seed=3, step=0)
        after_first = weights()
        assert first_run.train(_critic_rollouts(), seed=3, step=0) == trained  # the retry
        assert all(torch.equal(a, b) for a, b in zip(after_first, weights()))

        fresh_run = RemoteCritic(url, max_retries=0)
        assert fresh_run.run_id != first_run.run_id
        again = fresh_run.train(_critic_rollouts(), seed=3, step=0)
        assert again != trained  # trained again, on already-updated weights
        assert not all(torch.equal(a, b) for a, b in zip(after_first, weights()))
        with HTTPClient(url, max_retries=0) as client:
            with pytest.raises(ServerRequestError) as err:
                client.post("/train", {"step": 0, "seed": 0, "run_id": 7, "token_ids": [[1, 2]], "prompt_lengths": [1],
                                       "values": [[0.0]], "returns": [[0.0]]})
            assert err.value.status_code == 422


def test_critic_server_reset_restores_its_start_up_state(tmp_path, rm_dir):
    """POST /reset after training: the start-up weights, no Adam moments, the LR schedule at step 0 and an empty
    retry cache, so the same /train (same run id and step, even) trains again and gives the first metrics."""
    from nemo_aligner.servers.critic_server import RemoteCritic

    app = _critic_server(tmp_path, rm_dir)
    critic = app.state.critic
    weights = lambda: [p.detach().clone() for p in critic.module.parameters()]  # noqa: E731
    initial = weights()
    with BackgroundServer(app) as url:
        run = RemoteCritic(url, max_retries=0)
        values = run.infer(_critic_rollouts())
        trained = run.train(_critic_rollouts(), seed=3, step=0)
        assert not all(torch.equal(a, b) for a, b in zip(initial, weights()))
        run.reset()
        run.reset()  # idempotent: a retried reset changes nothing
        assert all(torch.equal(a, b) for a, b in zip(initial, weights()))
        assert len(critic.optimizer.state) == 0 and critic.scheduler.last_epoch == 0
        assert torch.equal(run.infer(_critic_rollouts()), values)
        with HTTPClient(url, max_retries=0) as client:
            assert client.get("/info")["last_trained_step"] is None
        assert run.train(_critic_rollouts(), seed=3, step=0) == trained  # trained again, not the cached answer


def test_critic_server_prunes_to_the_steps_it_is_told(tmp_path, rm_dir):
    from nemo_aligner.servers.critic_server import RemoteCritic

    with BackgroundServer(_critic_server(tmp_path, rm_dir)) as url:
        critic = RemoteCritic(url, max_retries=0)
        for step in (1, 2, 3):
            critic.save(step)
        removed = critic.prune({2, 3, 9})
        assert [Path(p).name for p in removed] == ["step=0000001"]
        assert sorted(p.name for p in (tmp_path / "critic" / "checkpoints").iterdir()) == ["step=0000002",
                                                                                              "step=0000003"]
        with HTTPClient(url, max_retries=0) as client:
            with pytest.raises(ServerRequestError) as err:
                client.post("/prune", {"keep_steps": "all"})
            assert err.value.status_code == 422


def test_served_critic_checkpoints_follow_the_actors_top_k(tmp_path, tiny_model_dir, rm_dir):
    """save_top_k=1, a checkpoint every step for 3 steps: the critic server keeps exactly the actor's steps."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    actor = load_example_script("train_gpt_ppo_actor")
    policy_app, _ = load_example_script("serve_initial_policy").build(compose_cfg(
        "inference_initial_policy", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}"))
    rm_app, _ = load_example_script("serve_reward_model").build(
        compose_cfg("inference_rm", "trainer.accelerator=cpu", f"rm_model_file={rm_dir}"))
    critic_app = _critic_server(tmp_path, rm_dir)
    with BackgroundServer(critic_app) as critic_url, BackgroundServer(policy_app) as policy_url, \
            BackgroundServer(rm_app) as rm_url:
        port = lambda url: url.rsplit(":", 1)[1]  # noqa: E731
        out = actor.run(ppo_cfg(
            tmp_path, tiny_model_dir, prompts, "trainer.ppo.max_epochs=2", "trainer.ppo.max_steps=3",
            "trainer.ppo.save_interval=1",
            "trainer.ppo.val_check_interval=1", "model.ppo.num_val_samples=4",
            "exp_manager.checkpoint_callback_params.save_top_k=1", "exp_manager.export_hf=false",
            "remote_critic_rm.enable=true", f"remote_critic_rm.critic.port={port(critic_url)}",
            f"remote_critic_rm.initial_policy.port={port(policy_url)}",
            f"remote_critic_rm.reward_model.port={port(rm_url)}"))
    steps = lambda d: sorted(p.name for p in d.iterdir() if not p.name.startswith("."))  # noqa: E731
    actor_steps = steps(Path(out["log_dir"]) / "checkpoints")
    assert "step=0000003" in actor_steps and len(actor_steps) <= 2  # the best one and the latest
    assert steps(tmp_path / "critic" / "checkpoints") == actor_steps


def _standardised_rm(tmp_path, rm_dir, mean, std):
    """A copy of the tiny RM export whose config.json stores reward_standardization {mean, std}."""
    import json
    import shutil

    from nemo_aligner.models.reward_model import STANDARDIZATION_KEY

    path = tmp_path / "standardised_rm"
    shutil.copytree(rm_dir, path)
    config = json.loads((path / "config.json").read_text())
    config[STANDARDIZATION_KEY] = {"mean": mean, "std": std}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_critic_values_are_standardised_like_the_rewards(tmp_path, rm_dir):
    """An RM export with reward_standardization {mean 0.7, std 0.05}: the critic initialised from it (colocated and
    served) outputs (head - 0.7) / 0.05, the scale of the rewards. The value read where the token after the response
    would be predicted equals the RM's (standardised) reward of that response, and the value loss trains on the
    standardised values. The critic server's model.reward_standardization keys override the export's."""
    from omegaconf import OmegaConf

    from nemo_aligner.algorithms.ppo import critic_values, update_critic
    from nemo_aligner.models.critic import HFCritic
    from nemo_aligner.models.reward_model import RewardScorer
    from nemo_aligner.servers.critic_server import RemoteCritic
    from nemo_aligner.utils.runtime import build_fabric

    mean, std = 0.7, 0.05
    std_rm = _standardised_rm(tmp_path, rm_dir, mean, std)
    fabric = build_fabric(OmegaConf.create({"accelerator": "cpu", "devices": 1}), seed=5)
    model_cfg = OmegaConf.create({"optim": {"name": "adamw", "lr": 1e-3}})
    critic = HFCritic(fabric, model_cfg, str(std_rm), max_steps=1)
    raw_critic = HFCritic(fabric, model_cfg, str(rm_dir), max_steps=1)
    rollouts = _critic_rollouts()
    values = rollouts.per_sequence(critic_values(critic, rollouts, 4))
    raw = rollouts.per_sequence(critic_values(raw_critic, rollouts, 4))
    assert (critic.reward_mean, critic.reward_std) == (mean, std) and (raw_critic.reward_mean, raw_critic.reward_std) == (0.0, 1.0)
    for v, r in zip(values, raw):
        assert v == pytest.approx([(x - mean) / std for x in r], rel=1e-5, abs=1e-4)
    rewards = RewardScorer.from_pretrained(str(std_rm)).score([seq[:-1] for seq in rollouts.sequences()])
    assert [v[-1] for v in values] == pytest.approx(rewards, rel=1e-4, abs=1e-4)
    assert max(abs(x) for x in rewards) > 1.0  # far from the raw head's scale (|raw| < 0.2 here)

    # training: one optimizer step on all four rollouts; values_mean is that of the standardised values before it
    rollouts.values = rollouts.per_token(values)
    metrics = update_critic(critic, rollouts, 4, 4)
    flat = [x for v in values for x in v]
    assert metrics["values_mean"] == pytest.approx(sum(flat) / len(flat), rel=1e-4)

    def server(*overrides):
        return load_example_script("serve_ppo_critic").build(compose_cfg(
            "gpt_ppo_critic", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={std_rm}",
            f"exp_manager.explicit_log_dir={tmp_path / 'critic'}", "exp_manager.export_hf=false", *overrides))[0]

    with BackgroundServer(server()) as url:
        served = rollouts.per_sequence(RemoteCritic(url, max_retries=0).infer(rollouts))
    for a, b in zip(served, values):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
    with BackgroundServer(server("model.reward_standardization.enable=true", "model.reward_standardization.mean=0.0",
                                 "model.reward_standardization.std=1.0")) as url:
        overridden = rollouts.per_sequence(RemoteCritic(url, max_retries=0).infer(rollouts))
    for a, b in zip(overridden, raw):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="reward_standardization.enable=true needs"):
        server("model.reward_standardization.enable=true")


def test_two_rank_colocated_critic_steps_and_lr_match_one_rank(tmp_path, tiny_model_dir, rm_dir):
    """Data parallelism over 2 gloo processes, critic global batch 4 of 8 rollouts: each rank trains its replica on
    2 of its 4 rollouts per optimizer step, so after every PPO step the critic has made the one-process run's 2
    optimizer steps and sits at the same point of its LR schedule (not 1 step, half-way through its decay)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cmd = lambda run: ppo_command(tmp_path, tiny_model_dir, prompts, run,  # noqa: E731
                                   f"reward_model.restore_from_path={rm_dir}", f"critic.restore_from_path={rm_dir}",
                                   "model.global_batch_size=4", "model.micro_batch_size=2",
                                   "critic.optim.sched.min_lr=1e-4",
                                   "exp_manager.checkpoint_callback_params.save_top_k=-1")
    run_ppo_ranks(cmd("one"), 1)
    run_ppo_ranks(cmd("two"), 2)
    for step in (1, 2):
        states = [torch.load(tmp_path / run / "critic_checkpoints" / f"step={step:07d}" / "state.pt",
                             map_location="cpu", weights_only=False) for run in ("one", "two")]
        assert [s["scheduler"]["last_epoch"] for s in states] == [2 * step, 2 * step]
        lrs = [s["optimizer"]["param_groups"][0]["lr"] for s in states]
        assert lrs[1] == pytest.approx(lrs[0], rel=1e-9)
    assert lrs[0] == pytest.approx(1e-4)  # the schedule of 2 PPO steps x 2 optimizer steps ran to its end
    for run in ("one", "two"):
        assert csv_column(tmp_path / run, "train/critic_optimizer_steps") == [2.0, 2.0]
        assert csv_column(tmp_path / run, "train/actor_optimizer_steps") == [2.0, 2.0]


def test_two_rank_served_critic_trains_once_per_ppo_step(tmp_path, tiny_model_dir, rm_dir, monkeypatch):
    """Served mode with 2 actor ranks: rank 0 sends the critic server all 8 rollouts of a PPO step in one /train,
    so the server trains once per PPO step (one optimizer step of its global batch 8), not once per rank on 4."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    critic_app = load_example_script("serve_ppo_critic").build(compose_cfg(
        "gpt_ppo_critic", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={rm_dir}",
        "model.optim.lr=1e-3", "model.global_batch_size=8", "model.micro_batch_size=4", "trainer.ppo.max_steps=2",
        f"exp_manager.explicit_log_dir={tmp_path / 'critic'}", "exp_manager.export_hf=false"))[0]
    critic = critic_app.state.critic
    import nemo_aligner.servers.critic_server as critic_server

    trained, original = [], critic_server.update_critic
    monkeypatch.setattr(critic_server, "update_critic",
                        lambda c, rollouts, *a, **k: (trained.append(len(rollouts)), original(c, rollouts, *a, **k))[1])
    policy_app, _ = load_example_script("serve_initial_policy").build(compose_cfg(
        "inference_initial_policy", "trainer.accelerator=cpu", f"pretrained_checkpoint.restore_from_path={tiny_model_dir}"))
    rm_app, _ = load_example_script("serve_reward_model").build(
        compose_cfg("inference_rm", "trainer.accelerator=cpu", f"rm_model_file={rm_dir}"))
    with BackgroundServer(critic_app) as critic_url, BackgroundServer(policy_app) as policy_url, \
            BackgroundServer(rm_app) as rm_url:
        port = lambda url: url.rsplit(":", 1)[1]  # noqa: E731
        run_ppo_ranks(ppo_command(tmp_path, tiny_model_dir, prompts, "served", "model.global_batch_size=8",
                                "model.micro_batch_size=4", "remote_critic_rm.enable=true",
                                f"remote_critic_rm.critic.port={port(critic_url)}",
                                f"remote_critic_rm.initial_policy.port={port(policy_url)}",
                                f"remote_critic_rm.reward_model.port={port(rm_url)}"), 2)
    assert trained == [8, 8]  # one /train per PPO step, with both ranks' rollouts
    assert critic.scheduler.last_epoch == 2  # one optimizer step per PPO step, as a one-rank actor gives
    assert csv_column(tmp_path / "served", "train/critic_optimizer_steps") == [1.0, 1.0]
    steps = lambda d: sorted(p.name for p in d.iterdir() if not p.name.startswith("."))  # noqa: E731
    assert "step=0000002" in steps(tmp_path / "critic" / "checkpoints")  # saved once, by rank 0
    assert steps(tmp_path / "critic" / "checkpoints") == steps(tmp_path / "served" / "checkpoints")
