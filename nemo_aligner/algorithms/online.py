"""What the online algorithms (PPO, rejection sampling) share.

* **Rewards**: a reward function (:data:`RewardFn`) is any ``reward_fn(prompt_ids, response_ids) -> list[float]``,
  one score per response; :mod:`nemo_aligner.recipes.online` builds one from a local reward model or the
  reward-model server.
* **Run length**: :func:`compute_online_max_steps` (steps of ``num_rollout_samples`` prompts each).
* **The loop**: :class:`OnlineTrainer` generates rollouts (:meth:`OnlineTrainer.generate_rollouts`), scores them
  (:func:`score_rewards`; a chat turn that ended is scored with the template's end-of-turn suffix, as the reward
  model was trained), runs validation rollouts on the first ``num_val_samples`` validation prompts and writes
  their sample table, and drives ``fit`` (validation, checkpoints with the data position, exact resume, logging and
  the HF export, through :class:`~nemo_aligner.algorithms.base.TrainingLoop`). A subclass says what one step does
  (``train_step``) and what validation reports (``validate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nemo_aligner.algorithms.base import RunContext, TrainingLoop
from nemo_aligner.data.prompts import EndOfTurn, EndStringClose, end_of_turn_rule, end_string_close, scored_response_ids
from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.data.samplers import GlobalBatchSampler
from nemo_aligner.generation import response_seed
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.utils.config import ConfigValueError
from nemo_aligner.utils.logging import format_metrics

RewardFn = Callable[[list[list[int]], list[list[int]]], list[float]]


def score_rewards(reward_fn: RewardFn, rollouts: Rollouts, micro_batch_size: int | None = None,
                  end_of_turn: EndOfTurn | None = None, end_string: EndStringClose | None = None) -> list[float]:
    """Set ``rollouts.rewards`` (``[S]`` float64) with ``reward_fn``, called on consecutive micro-batches of
    ``micro_batch_size`` rollouts (``None``: one call for all); returns the rewards as Python floats, in rollout
    order.

    The reward function gets each rollout's prompt ids and its *scored* response: with ``end_of_turn`` (the
    policy's chat template, :func:`~nemo_aligner.data.prompts.end_of_turn_rule`), a rollout that ``ended`` at the
    end-of-turn token after a chat prompt is scored with the template's suffix appended (ChatML: ``<|im_end|>`` then
    ``\\n``), the tokens reward-model training gave that turn, so the reward is read where the head was trained
    (:meth:`~nemo_aligner.data.prompts.EndOfTurn.scored_response`). With ``end_string`` (the run's
    ``end_strings``), a rollout that stopped at an end string is scored without the end string's tokens, closed by
    EOS (plain text) or the end-of-turn token and suffix (chat), as reward-model data is
    (:meth:`~nemo_aligner.data.prompts.EndStringClose.scored_response`). ``response_ids`` itself (what the policy
    and the critic train on) is unchanged.

    Raises:
        RuntimeError: the reward function returned the wrong number of scores.
    """
    size = micro_batch_size or max(len(rollouts), 1)
    prompts, responses, ended = rollouts.prompts(), rollouts.responses(), rollouts.ended.tolist()
    out: list[float] = []
    for start in range(0, len(rollouts), size):
        chunk = range(start, min(start + size, len(rollouts)))
        scored = [scored_response_ids(prompts[i], responses[i], ended[i], end_of_turn, end_string) for i in chunk]
        rewards = list(reward_fn([prompts[i] for i in chunk], scored))
        if len(rewards) != len(chunk):
            raise RuntimeError(f"the reward function returned {len(rewards)} scores for {len(chunk)} responses")
        out.extend(float(value) for value in rewards)
    rollouts.rewards = torch.tensor(out, dtype=torch.float64)
    return out


# ---------------------------------------------------------------------------------------------------------------
# rollouts and run length
# ---------------------------------------------------------------------------------------------------------------
def compute_online_max_steps(num_prompts: int, cfg: Any, section: str) -> int:
    """Steps of an online run: ``max_epochs * (num_prompts // num_rollout_samples)``, capped by ``max_steps`` >= 0
    (the incomplete last prompt batch of an epoch is dropped). ``cfg`` has ``num_rollout_samples``, ``max_epochs``
    and ``max_steps``; ``section`` (``"ppo"``, ``"rs"``) names the config keys in the error.

    Raises:
        ValueError: the result is 0 (fewer prompts than one rollout batch, or ``max_steps=0``).
    """
    per_epoch = num_prompts // cfg.num_rollout_samples
    steps = cfg.max_epochs * per_epoch if cfg.max_steps < 0 else min(cfg.max_steps, cfg.max_epochs * per_epoch)
    if steps < 1:
        raise ConfigValueError(
            f"nothing to train: {num_prompts} prompts, model.{section}.num_rollout_samples={cfg.num_rollout_samples}, "
            f"trainer.{section}.max_epochs={cfg.max_epochs}, trainer.{section}.max_steps={cfg.max_steps} give 0 "
            f"{section.upper()} steps"
        )
    return steps


# ---------------------------------------------------------------------------------------------------------------
# the online loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RolloutSetup:
    """What an online run samples responses to, and how: the prompts and the generation settings.

    Fields:
        train_prompts, val_prompts: tokenised prompts (lists of token ids); ``val_prompts`` may be empty or None.
        sampling_params, length_params: :class:`nemo_aligner.generation.SamplingParams` / ``LengthParams`` of the
            training rollouts (rejection sampling validates with the same, greedy).
        eos_token_id: the token given to an empty response (a response needs at least one token); ``None``: the
            policy tokenizer's.
    """

    train_prompts: Sequence[Sequence[int]]
    val_prompts: Sequence[Sequence[int]] | None
    sampling_params: Any
    length_params: Any
    eos_token_id: int | None = None


class OnlineTrainer(TrainingLoop):
    """The parts of an online trainer that PPO and rejection sampling share (see the module docstring).

    Args:
        model: the policy being trained (PPO's actor); must implement ``generate`` and ``get_logprobs``.
        reward_fn: ``(prompt_ids, response_ids) -> list[float]``, one score per response.
        setup: the prompts and generation settings (:class:`RolloutSetup`).
        cfg: the algorithm's config (``num_rollout_samples``, ``num_val_samples``, ``num_val_samples_to_show``,
            ``val_check_interval``, ``save_interval``, ``seed``, ...).
        context: the run (:class:`~nemo_aligner.algorithms.base.RunContext`): ``hf_export/`` and ``val_samples/``
            go to its ``log_dir``; its checkpoints monitor ``val_global_rewards``, mode ``max``.
        rollout_micro_batch_size: the sampler's micro-batch (the prompts of a step are this rank's share either way).

    A subclass sets ``max_steps`` and implements ``train_step() -> (metrics, rollouts)`` and ``validate()``.
    """

    name = "online"
    summary_keys: list[str] = []
    #: Log-line label -> metric of the step times shown after each step's summary.
    timing_keys = {"generation": "time_generation", "training": "time_train"}
    #: Validate once before the first step of a fresh run (``initial_val_metrics``).
    validate_before_training = False
    #: First line of the validation sample table.
    sample_table_title = "validation samples"

    def __init__(self, model: AlignableModel, reward_fn: RewardFn, setup: RolloutSetup, cfg: Any, context: RunContext,
                 rollout_micro_batch_size: int = 1):
        super().__init__(model, context)
        self.reward_fn = reward_fn
        self.train_prompts = [list(p) for p in setup.train_prompts]
        self.val_prompts = [list(p) for p in (setup.val_prompts or [])]
        self.cfg = cfg
        self.sampling_params = setup.sampling_params
        self.length_params = setup.length_params
        self.tokenizer = model.tokenizer
        eos_token_id = setup.eos_token_id
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        self.eos_token_id = eos_token_id
        # what the reward model reads after a chat turn that ended (the template's suffix after <|im_end|>)
        self.end_of_turn = (end_of_turn_rule(self.tokenizer, model.eos_token_ids())
                            if self.tokenizer is not None else None)
        # a rollout stopped at an end string is scored without it, closed as the reward model's data is
        self.end_string = end_string_close(self.tokenizer, self.sampling_params.end_strings,
                                           eos_token_id)
        self.sampler = GlobalBatchSampler(
            len(self.train_prompts), cfg.num_rollout_samples, rollout_micro_batch_size,
            rank=model.data_parallel_rank, world_size=model.data_parallel_size, seed=cfg.seed,
        )
        self.initial_val_metrics: dict[str, float] = {}

    @property
    def samples_per_step(self) -> int:
        """Prompts per step over all ranks (``num_rollout_samples``)."""
        return self.cfg.num_rollout_samples

    def _step_seed(self, step: int) -> int:
        """The sampling seed of step ``step`` (the same after a resume)."""
        return self.cfg.seed + 1_000_003 * (step + 1)

    def step_prompt_indices(self) -> list[int]:
        """This rank's prompts of step ``self.step`` as dataset indices (global, whatever the rank)."""
        return [i for mb in self.sampler.micro_batches(self.step) for i in mb]

    def step_prompts(self) -> list[list[int]]:
        """This rank's prompts of step ``self.step`` (deterministic, resumable order; :meth:`step_prompt_indices`)."""
        return [self.train_prompts[i] for i in self.step_prompt_indices()]

    # ---- rollouts ---------------------------------------------------------------------------------------------
    def generate_rollouts(self, prompts: list[list[int]], num_per_prompt: int, sampling_params: Any,
                          micro_batch_size: int, seed: int, prompt_indices: Sequence[int] | None = None) -> Rollouts:
        """``num_per_prompt`` responses to each prompt, in generation calls of ``micro_batch_size`` responses.

        Response ``j`` of prompt ``p`` samples with its own seed
        ``response_seed(seed, prompt_indices[p], j)`` (:func:`nemo_aligner.generation.response_seed`), where
        ``prompt_indices`` are the prompts' global indices (in the dataset, default ``0..len(prompts)-1``). So the
        responses do not depend on how the prompts are split over data-parallel ranks or micro-batches, and two
        ranks never share random numbers.

        Returns ``len(prompts) * num_per_prompt`` :class:`~nemo_aligner.data.rollouts.Rollouts`, prompt-major
        (rollout ``p * num_per_prompt + j`` is sample ``j`` of prompt ``p``: ``prompt_index`` ``p``, the position
        in ``prompts``, and ``sample_index`` ``j``), with ``ended``; an empty response becomes ``[eos_token_id]``.

        Raises:
            ValueError: ``prompt_indices`` does not have one entry per prompt.
        """
        indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
        if len(indices) != len(prompts):
            raise ValueError(f"prompt_indices has {len(indices)} entries for {len(prompts)} prompts")
        rows = [(p, j) for p in range(len(prompts)) for j in range(num_per_prompt)]
        responses, ended, engine_logprobs = [], [], []
        with self.model.inference():
            for start in range(0, len(rows), micro_batch_size):
                chunk = rows[start : start + micro_batch_size]
                out = self.model.generate([prompts[p] for p, _ in chunk], sampling_params, self.length_params,
                                          seeds=[response_seed(seed, indices[p], j) for p, j in chunk])
                logprobs = out.logprobs if out.logprobs is not None else [None] * len(out.response_ids)
                for response, done, lp in zip(out.response_ids, out.ended, logprobs):
                    responses.append(list(response) or [int(self.eos_token_id if self.eos_token_id is not None else 0)])
                    ended.append(bool(done))
                    engine_logprobs.append(list(lp) if lp and len(lp) == len(response) else None)
        known = any(lp is not None for lp in engine_logprobs)
        return Rollouts.from_lists(
            [prompts[p] for p, _ in rows], responses, ended, prompt_index=[p for p, _ in rows],
            sample_index=[j for _, j in rows],
            engine_logprobs=[lp if lp is not None else [float("nan")] * len(r) for lp, r in zip(engine_logprobs, responses)]
            if known else None,
        )

    # ---- validation -------------------------------------------------------------------------------------------
    def validation_rollouts(self, sampling_params: Any, micro_batch_size: int,
                            score_micro_batch_size: int | None = None) -> Rollouts:
        """One response (``sampling_params``, seeded by ``cfg.seed`` and the prompt's index) to each of this rank's
        share of the first ``num_val_samples`` validation prompts, scored (:func:`score_rewards` in calls of
        ``score_micro_batch_size``); no rollout (and no generation call) when this rank has no validation prompt."""
        rank, world = self.model.data_parallel_rank, self.model.data_parallel_size
        prompts = self.val_prompts[: self.cfg.num_val_samples][rank::world]
        if not prompts:
            return Rollouts.from_lists([], [], rewards=[])
        rollouts = self.generate_rollouts(prompts, 1, sampling_params, micro_batch_size, self.cfg.seed,
                                          prompt_indices=range(rank, rank + world * len(prompts), world))
        score_rewards(self.reward_fn, rollouts, score_micro_batch_size, self.end_of_turn, self.end_string)
        return rollouts

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.model.decode(ids)
        except NotImplementedError:  # a model without a tokenizer: the ids themselves
            return " ".join(map(str, ids))

    def write_samples(self, rollouts: Rollouts) -> Path:
        """Write ``<log_dir>/val_samples/step=<N>.md``, a table of the scored rollouts' prompts (last 300
        characters), responses and rewards (also to ``context.log_table`` as ``val/samples``: a W&B table when W&B
        is on), and log the first two responses; returns the file."""
        cell = lambda text: text.replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
        prompts, responses, rewards = rollouts.prompts(), rollouts.responses(), rollouts.rewards.tolist()
        lines = [f"# {self.sample_table_title}, step {self.step}", "",
                 "| # | prompt | response | reward |", "|---|---|---|---|"]
        for i, (prompt, response, reward) in enumerate(zip(prompts, responses, rewards)):
            lines.append(f"| {i} | {cell(self._decode(prompt)[-300:])} | {cell(self._decode(response))} | "
                         f"{reward:.4g} |")
        out = self.context.log_dir / "val_samples" / f"step={self.step:07d}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        self.context.log_table("val/samples", ["prompt", "response", "reward"],
                               [[self._decode(p)[-300:], self._decode(r), float(w)]
                                for p, r, w in zip(prompts, responses, rewards)], self.step)
        for response, reward in list(zip(responses, rewards))[:2]:
            self.log.info(f"val sample (reward {reward:.3g}): {self._decode(response)[:200]!r}")
        return out

    # ---- loop -------------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[dict[str, float], Rollouts]:
        """Run step ``self.step``; returns ``(metrics averaged over ranks, this rank's rollouts)``."""
        raise NotImplementedError

    def _progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {}

    def _logged_counters(self) -> dict[str, float]:
        """The loop counters logged with each step's metrics (by default :meth:`_counters`, the checkpointed ones)."""
        return self._counters()

    def _after_step(self) -> None:
        """Called after each step is counted and logged, before its validation and checkpoint (e.g. to end an
        iteration); nothing by default."""

    def fit(self) -> list[dict[str, float]]:
        """Run to ``max_steps`` steps; returns this call's per-step metrics (also logged under ``train/``).

        With :attr:`validate_before_training`, a fresh run (step 0) with validation enabled
        (``val_check_interval > 0``) validates once before training (``initial_val_metrics``, logged at step 0).
        Validation then runs every ``val_check_interval`` steps and at the end, checkpoints every
        ``save_interval`` steps and at the end.
        """
        from tqdm.auto import tqdm

        self._maybe_resume()
        val_every, save_every = self.cfg.val_check_interval, self.cfg.save_interval
        if self.validate_before_training and self.step == 0 and val_every > 0:
            self.initial_val_metrics = self._run_validation()
        progress = tqdm(total=self.max_steps, initial=self.step, desc=self.name,
                        disable=not self.context.is_global_zero, dynamic_ncols=True)
        while self.step < self.max_steps:
            with self._stop_on_non_finite():
                metrics, _ = self.train_step()
            self.step += 1
            metrics["consumed_samples"] = self.step * self.samples_per_step
            metrics.update(self._logged_counters())
            self.history.append(metrics)
            self.context.log_metrics({f"train/{k}": v for k, v in metrics.items()}, self.step)
            progress.update(1)
            progress.set_postfix(**self._progress_postfix(metrics))
            if self.context.is_global_zero:
                times = ", ".join(f"{label} {metrics[key]:.1f}s" for label, key in self.timing_keys.items())
                self.log.info(f"step {self.step}/{self.max_steps}: {format_metrics(metrics, self.summary_keys)} "
                              f"({times})")
            self._after_step()
            self._validate_and_save(val_every, save_every)
        progress.close()
        self._export()
        return self.history
