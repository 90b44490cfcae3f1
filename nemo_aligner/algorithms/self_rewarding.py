"""Self-rewarding and meta-rewarding training: the policy judges its own responses (LLM-as-a-judge) and is trained
with a DPO-family loss on the pairs its judgements pick.

Sources: Yuan et al. 2024, "Self-Rewarding Language Models" (arXiv 2401.10020): the additive 5-point judge rubric
(fig. 2), N responses per prompt each judged k times and averaged, chosen = highest and rejected = lowest mean score,
pairs with equal scores dropped, iterative DPO where iteration t+1 starts from (and uses as reference) the model of
iteration t (sec. 2.2-2.3). Wu et al. 2024, "Meta-Rewarding Language Models" (arXiv 2407.19594): the meta-judge
prompt (fig. 2), meta-judge comparisons of judgement pairs in both orders, an Elo score per judgement from those
battles, chosen/rejected judgements by Elo (sec. 2.2-2.3), the length-controlled choice of the actor pair with
``rho`` (sec. 2.3, "length-control mechanism") and the balancing of the judge pairs' score classes. Key names follow
NeMo-Aligner's unmerged self-rewarding pull request (``trainer.self_rewarding.*``, ``model.spin.*``).

One step, per global batch of prompts (:meth:`SelfRewardingTrainer.train_step`):

1. **Generate** ``num_responses_to_gen`` (N) responses per prompt with the reference policy's weights (the policy
   at the start of the iteration; ``model.reference_weights()``), through ``model.generate`` with one seed per
   response (:func:`nemo_aligner.generation.response_seed`).
2. **Judge** each response ``num_evals_to_average`` (k) times with the same weights and the judge template
   (:func:`~nemo_aligner.algorithms.llm_judge.render_template`, :func:`~nemo_aligner.algorithms.llm_judge.fit_judge_prompt`). A judgement's score is the regex match
   (:func:`~nemo_aligner.algorithms.llm_judge.build_reward_regex`) inside ``[judge_score_low, judge_score_high]`` (:func:`~nemo_aligner.algorithms.llm_judge.parse_score`); others are
   dropped; a response's score is the mean of its valid judgements, and their variance is kept
   (:func:`~nemo_aligner.algorithms.llm_judge.aggregate_scores`). With ``constrain_judge_output`` (default) every judgement parses
   (:meth:`SelfRewardingTrainer.constrained_judgements`).
3. **Pair** per prompt (:func:`select_pair`): chosen from ``[(1-rho) s_max + rho s_min, s_max]``, rejected from
   ``[s_min, (1-rho) s_min + rho s_max]``; with ``rho > 0`` the shortest chosen and the longest rejected, with
   ``rho = 0`` the lowest judgement variance. A prompt with fewer than 2 candidates (a valid score and an ended
   response), equal scores or identical tokens is a bad sample: masked out of the loss and counted.
4. **Meta-judge** (``use_meta_judge``): the response with the highest judgement variance; each pair of its
   judgements with different scores is shown in both orders, score text stripped, to the meta-judge; an Elo per
   judgement from a Bradley-Terry fit (:func:`bradley_terry_elo`); chosen = best Elo, rejected = worst. The pairs go
   to a buffer (checkpointed), are class-balanced (:func:`balance_meta_pairs`) and replace bad pairs first, then
   policy pairs, up to ``meta_judge_pcnt`` of the batch (:func:`mix_meta_pairs`).
5. **Update**: one optimizer step of the DPO-family loss of :func:`nemo_aligner.algorithms.dpo.dpo_loss_and_metrics`
   (reused) on the kept pairs; iteration 0 with ``first_iteration_sft`` trains SFT on the dataset's answers instead.
6. **Iteration boundary** (every ``steps_per_epoch * max_epochs`` steps): the reference becomes the current policy
   (``model.reset_reference_to_policy()``), the optimizer moments and step are reset (``model.reset_optimizer()``;
   the LR schedule runs over the whole run), and ``beta``/``rho`` take the next iteration's values
   (:func:`value_for_iteration`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nemo_aligner.algorithms.base import RunContext, optimizer_step
from nemo_aligner.algorithms.dpo import PREFERENCE_LOSSES, DPOLossConfig, dpo_loss_and_metrics
from nemo_aligner.algorithms.online import OnlineTrainer, RolloutSetup
from nemo_aligner.algorithms.supervised import sft_loss_and_metrics
from nemo_aligner.algorithms.llm_judge import (
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_META_JUDGE_PROMPT,
    SCORE_PATTERN,
    WINNER_PATTERN,
    aggregate_scores,
    build_reward_regex,
    close_justification,
    constrained_judgement_max_tokens,
    constrained_judgement_regex,
    fit_judge_request,
    judge_prompt_text,
    judge_request_ids,
    parse_score,
    parse_winner,
    strip_score,
)
from nemo_aligner.data.chat import encode, tokenize_prompt_response
from nemo_aligner.data.jsonl import DataFormatError, iter_jsonl
from nemo_aligner.data.preference_batch import collate_preference_pairs
from nemo_aligner.data.prompts import parse_prompt_record, tokenize_prompt
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.data.sft import parse_sft_record
from nemo_aligner.generation import response_seed
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.utils.checkpoint import DamagedCheckpointError
from nemo_aligner.utils.config import (ConfigValueError, as_list, config_schema, dataclass_from_sections, key,
                                       reward_regex)

# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
@config_schema("gpt_self_rewarding", trainer="trainer.self_rewarding", spin="model.spin", model="model")
@dataclass
class SelfRewardingConfig:
    """``trainer.self_rewarding`` and ``model.spin`` settings plus batch sizes (NeMo-Aligner's key names); the
    defaults are ``conf/gpt_self_rewarding.yaml``'s values. See docs/user-guide/self_rewarding.md for each key.

    ``length_control`` and ``ref_policy_kl_penalty`` are a number or a list with one value per iteration
    (:func:`value_for_iteration`). ``meta_judge_pcnt < 0`` means no cap (meta pairs may fill the whole batch).
    ``llm_judge_prompt``/``llm_meta_judge_prompt`` null: the papers' prompts (:data:`DEFAULT_JUDGE_PROMPT`,
    :data:`DEFAULT_META_JUDGE_PROMPT`). ``sft_average_log_probs`` null: follows ``preference_average_log_probs``.
    """

    max_iterations: int = key("trainer", 3)
    max_epochs: int = key("trainer", 1)
    max_steps: int = key("trainer", -1)
    val_check_interval: int = key("trainer", 10)
    save_interval: int = key("trainer", 10)
    limit_train_batches: int | float = key("trainer", 1.0)
    limit_val_batches: int | float = key("trainer", 1.0)
    gradient_clip_val: float = key("trainer", 1.0)
    num_responses_to_gen: int = key("spin", 4)
    num_evals_to_average: int = key("spin", 3)
    length_control: Any = key("spin", 0.0)
    use_meta_judge: bool = key("spin", False)
    meta_judge_pcnt: float = key("spin", -1.0)
    meta_max_relative_pcnt: float = key("spin", 0.4)
    first_iteration_sft: bool = key("spin", False)
    ref_policy_kl_penalty: Any = key("spin", 0.1)
    preference_loss: str = key("spin", "dpo")
    preference_loss_weight: float = key("spin", 1.0)
    sft_loss_weight: float = key("spin", 0.0)
    gt_reward_scale: float = key("spin", 1.0)
    preference_average_log_probs: bool = key("spin", False)
    sft_average_log_probs: bool = key("spin", None, nullable=True)
    judge_score_low: int = key("spin", 0)
    judge_score_high: int = key("spin", 5)
    judge_reward_regex: str = key("spin", "(?i)(?:Score|Points): {{ reward }}")
    meta_judge_reward_regex: str = key("spin", "(?i)Winner: (?:Judgement|Judgment) {{ reward }}")
    llm_judge_prompt: str = key("spin", None, nullable=True)
    llm_meta_judge_prompt: str = key("spin", None, nullable=True)
    normalise_prompt: bool = key("spin", False)
    rollout_micro_batch_size: int = key("spin", 8)
    constrain_judge_output: bool = key("spin", True)
    judge_max_length: int = key("spin", 128)
    judge_score_prefix: str = key("spin", "Score: ")
    meta_judge_score_prefix: str = key("spin", "Winner: Judgement ")
    num_val_samples_to_show: int = key("spin", 4)
    judge_endpoint: str = key("spin", None, nullable=True)
    judge_model_path: str = key("spin", None, nullable=True)
    judge_model: str = key("spin", None, nullable=True)
    judge_api_key_env: str = key("spin", "OPENAI_API_KEY", nullable=True)
    judge_max_concurrency: int = key("spin", 16)
    global_batch_size: int = key("model", 8)
    micro_batch_size: int = key("model", 1)
    seed: int = key("model", 1234)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "SelfRewardingConfig":
        """From a full config (``trainer.self_rewarding``, ``model.spin``, ``model``); an absent key takes the
        field's default.

        Raises:
            ConfigValueError: a value of the wrong type or out of range, naming its key (see :meth:`check`).
        """
        out = dataclass_from_sections(cls, {"trainer": cfg.trainer.self_rewarding, "spin": cfg.model.spin,
                                            "model": cfg.model})
        for name in ("length_control", "ref_policy_kl_penalty"):
            value = getattr(out, name)
            setattr(out, name, [float(v) for v in value] if isinstance(value, (list, tuple)) or
                    hasattr(value, "__len__") and not isinstance(value, str) else float(value))
        if out.sft_average_log_probs is None:
            out.sft_average_log_probs = out.preference_average_log_probs
        out.llm_judge_prompt = out.llm_judge_prompt or DEFAULT_JUDGE_PROMPT
        out.llm_meta_judge_prompt = out.llm_meta_judge_prompt or DEFAULT_META_JUDGE_PROMPT
        for name in ("judge_endpoint", "judge_model", "judge_api_key_env", "judge_model_path"):  # null: "" (no separate judge / no key)
            setattr(out, name, str(getattr(out, name) or ""))
        out.check()
        return out

    def check(self, data_parallel_size: int = 1) -> None:
        """Raise :class:`ConfigValueError` naming the first out-of-range key."""
        for name in ("max_iterations", "num_responses_to_gen", "num_evals_to_average", "rollout_micro_batch_size"):
            if getattr(self, name) < 1:
                section = "trainer.self_rewarding" if name == "max_iterations" else "model.spin"
                raise ConfigValueError(f"{section}.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_responses_to_gen < 2:
            raise ConfigValueError(f"model.spin.num_responses_to_gen={self.num_responses_to_gen}: a pair needs >= 2")
        if self.preference_loss not in PREFERENCE_LOSSES:
            raise ConfigValueError(f"model.spin.preference_loss={self.preference_loss!r}: use one of "
                                   f"{', '.join(PREFERENCE_LOSSES)}")
        if self.judge_score_low >= self.judge_score_high:
            raise ConfigValueError(f"model.spin.judge_score_low={self.judge_score_low} must be < judge_score_high="
                                   f"{self.judge_score_high}")
        for name, low_open in (("ref_policy_kl_penalty", True), ("length_control", False)):
            values = getattr(self, name)
            values = values if isinstance(values, list) else [values]
            if isinstance(getattr(self, name), list) and len(values) != self.max_iterations:
                raise ConfigValueError(f"model.spin.{name} has {len(values)} values for trainer.self_rewarding."
                                       f"max_iterations={self.max_iterations} (give one per iteration, or a number)")
            for v in values:
                if (low_open and not v > 0) or (name == "length_control" and not 0.0 <= v <= 1.0):
                    raise ConfigValueError(f"model.spin.{name}={getattr(self, name)}: "
                                           + ("must be > 0" if low_open else "each value must lie in [0, 1]"))
        if not 0.0 < self.meta_max_relative_pcnt <= 1.0:
            raise ConfigValueError(f"model.spin.meta_max_relative_pcnt={self.meta_max_relative_pcnt} must lie in (0, 1]")
        if self.meta_judge_pcnt > 1.0:
            raise ConfigValueError(f"model.spin.meta_judge_pcnt={self.meta_judge_pcnt} must be <= 1 (< 0: no cap)")
        reward_regex(self.judge_reward_regex, "model.spin.judge_reward_regex")
        reward_regex(self.meta_judge_reward_regex, "model.spin.meta_judge_reward_regex")
        if self.judge_endpoint and not self.judge_model:
            raise ConfigValueError(f"model.spin.judge_endpoint={self.judge_endpoint!r} needs model.spin.judge_model "
                                   "(the served model's name)")
        if self.judge_endpoint and self.judge_model_path:
            raise ConfigValueError(f"model.spin.judge_endpoint={self.judge_endpoint!r} and model.spin.judge_model_path="
                                   f"{self.judge_model_path!r} are exclusive: set one separate judge")
        if self.judge_max_concurrency < 1:
            raise ConfigValueError(f"model.spin.judge_max_concurrency must be >= 1, got {self.judge_max_concurrency}")
        if self.judge_max_length < 1:
            raise ConfigValueError(f"model.spin.judge_max_length must be >= 1, got {self.judge_max_length}")
        if (self.global_batch_size < 1 or self.micro_batch_size < 1
                or self.global_batch_size % (self.micro_batch_size * data_parallel_size)):
            raise ConfigValueError(f"model.global_batch_size={self.global_batch_size} must be a positive multiple of "
                                   f"model.micro_batch_size={self.micro_batch_size} x data-parallel size "
                                   f"{data_parallel_size}")

    # what OnlineTrainer reads
    @property
    def num_rollout_samples(self) -> int:
        """Prompts per step: ``model.global_batch_size`` (one pair per prompt)."""
        return self.global_batch_size

    @property
    def num_val_samples(self) -> int:
        return self.global_batch_size

    def loss_config(self, iteration: int) -> DPOLossConfig:
        """The DPO-family loss settings of ``iteration`` (its ``ref_policy_kl_penalty``)."""
        return DPOLossConfig(
            ref_policy_kl_penalty=value_for_iteration(self.ref_policy_kl_penalty, iteration),
            preference_loss=self.preference_loss, gt_reward_scale=self.gt_reward_scale,
            preference_average_log_probs=self.preference_average_log_probs,
            sft_average_log_probs=self.sft_average_log_probs,
            preference_loss_weight=self.preference_loss_weight, sft_loss_weight=self.sft_loss_weight,
        )


def value_for_iteration(value: float | Sequence[float], iteration: int) -> float:
    """The per-iteration schedule of ``ref_policy_kl_penalty`` (beta) and ``length_control`` (rho): a number is used
    in every iteration; a list gives iteration ``i`` (0-based) its ``i``-th value (the last one past its end)."""
    if isinstance(value, (list, tuple)):
        return float(value[min(iteration, len(value) - 1)])
    return float(value)


def compute_self_rewarding_max_steps(num_prompts: int, cfg: SelfRewardingConfig) -> tuple[int, int]:
    """``(max_steps, steps_per_epoch)``: ``steps_per_epoch = num_prompts // global_batch_size`` limited by
    ``limit_train_batches`` (an int: batches; a float: a fraction), and ``max_steps = steps_per_epoch * max_epochs *
    max_iterations`` when ``trainer.self_rewarding.max_steps`` is negative, else that value (capped by the former).

    Raises:
        ConfigValueError: no step to run.
    """
    full = num_prompts // cfg.global_batch_size
    limit = cfg.limit_train_batches
    per_epoch = min(full, int(limit)) if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 \
        else int(full * float(limit)) if isinstance(limit, float) else full
    total = per_epoch * cfg.max_epochs * cfg.max_iterations
    steps = total if cfg.max_steps < 0 else min(cfg.max_steps, total)
    if steps < 1:
        raise ConfigValueError(f"nothing to train: {num_prompts} prompts, model.global_batch_size="
                               f"{cfg.global_batch_size}, trainer.self_rewarding.limit_train_batches={limit}, "
                               f"max_steps={cfg.max_steps} give 0 steps")
    return steps, per_epoch


# ---------------------------------------------------------------------------------------------------------------
# prompts with reference answers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PromptWithAnswer:
    """A training or validation prompt: ``prompt_ids`` (what the policy answers), ``prompt_text`` (what the judge
    sees in ``{{ prompt }}``) and, when the file has one, the reference answer ``answer_ids`` (SFT validation and
    ``first_iteration_sft``; None otherwise)."""

    prompt_ids: list[int]
    prompt_text: str
    answer_ids: list[int] | None


def load_prompts_with_answers(paths: Any, tokenizer, max_prompt_tokens: int, max_prompts: int | None = None,
                              normalise: bool = False) -> tuple[list[PromptWithAnswer], int]:
    """Read prompt files in the SFT chat formats (:func:`nemo_aligner.data.sft.parse_sft_record`: the prompt is
    what precedes the last assistant turn, the answer that turn), plain ``{"prompt"}`` lines (no answer) and HH-RLHF
    transcripts (the chosen transcript split at its last ``Assistant:``). Prompts keep their last
    ``max_prompt_tokens`` tokens. Returns ``(prompts, how many were cut)``.

    Raises:
        DataFormatError: naming file, line and field for a record no format accepts.
        ConfigValueError: no file given.
    """
    files = as_list(paths)
    if not files:
        raise ConfigValueError("no prompt files given (model.data.train_ds.file_path)")
    out: list[PromptWithAnswer] = []
    cut = 0
    for path in files:
        for line_no, record in iter_jsonl(path):
            if max_prompts is not None and 0 <= int(max_prompts) <= len(out):
                return out, cut
            try:
                example = parse_sft_record(record, path, line_no)
                if example.messages is not None:
                    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
                    prompt, answer = example.messages[:last], example.messages[last]["content"]
                    if not prompt:
                        raise DataFormatError(path, line_no, "messages", "no messages before the last assistant turn")
                else:
                    prompt, answer = example.prompt, example.response
            except DataFormatError:
                prompt, answer = parse_prompt_record(record, path, line_no), None
            try:
                if answer is not None:
                    response = answer if isinstance(prompt, str) or isinstance(answer, list) else \
                        [{"role": "assistant", "content": answer}]
                    prompt_ids, answer_ids = tokenize_prompt_response(prompt, response, tokenizer)
                else:
                    prompt_ids, answer_ids = tokenize_prompt(prompt, tokenizer), None
            except ValueError as err:
                raise DataFormatError(path, line_no, "prompt", str(err)) from None
            if len(prompt_ids) > max_prompt_tokens:
                prompt_ids, cut = prompt_ids[-max_prompt_tokens:], cut + 1
            out.append(PromptWithAnswer(prompt_ids, judge_prompt_text(prompt, tokenizer, normalise), answer_ids))
    return out, cut


@dataclass
class Candidate:
    """One response of a prompt as pair selection sees it: ``score`` (mean valid judgement, None: none valid),
    ``variance`` of its judgements, ``length`` (tokens), ``ended`` and its ``tokens`` (identity check)."""

    score: float | None
    variance: float | None
    length: int
    ended: bool
    tokens: tuple[int, ...] = ()


def select_pair(candidates: Sequence[Candidate], rho: float) -> tuple[int, int] | None:
    """``(chosen, rejected)`` indices among a prompt's responses, or None for a bad sample.

    Candidates are the responses with a score that ended. With ``s_max``/``s_min`` their highest/lowest score,
    chosen comes from ``[(1 - rho) s_max + rho s_min, s_max]`` and rejected from ``[s_min, (1 - rho) s_min + rho
    s_max]`` (Wu et al. 2024, sec. 2.3): with ``rho > 0`` chosen is the shortest response of its window and rejected
    the longest (length control); with ``rho = 0`` the windows are the single scores and each is the one with the
    lowest judgement variance. Ties are broken by the lower response index. Bad: fewer than 2 candidates, equal
    scores (``s_max == s_min``), or chosen and rejected with identical tokens.
    """
    pool = [i for i, c in enumerate(candidates) if c.score is not None and c.ended]
    if len(pool) < 2:
        return None
    s_max = max(candidates[i].score for i in pool)
    s_min = min(candidates[i].score for i in pool)
    if s_max == s_min:
        return None
    eps = 1e-9
    top = [i for i in pool if candidates[i].score >= (1 - rho) * s_max + rho * s_min - eps]
    bottom = [i for i in pool if candidates[i].score <= (1 - rho) * s_min + rho * s_max + eps]
    if rho > 0:
        chosen = min(top, key=lambda i: (candidates[i].length, i))
        rejected = min(bottom, key=lambda i: (-candidates[i].length, i))
    else:
        chosen = min(top, key=lambda i: (candidates[i].variance or 0.0, i))
        rejected = min(bottom, key=lambda i: (candidates[i].variance or 0.0, i))
    if chosen == rejected or candidates[chosen].tokens == candidates[rejected].tokens and candidates[chosen].tokens:
        return None
    return chosen, rejected


def bradley_terry_elo(num_players: int, battles: Sequence[tuple[int, int]], l2: float = 1e-6,
                      iterations: int = 100) -> list[float]:
    """Elo scores of ``num_players`` judgements from ``battles`` ``(winner, loser)``: a Bradley-Terry fit, i.e. a
    logistic regression without intercept of ``y = 1`` on ``x = e_winner - e_loser`` (and, symmetrically, ``y = 0``
    on ``-x``), with an L2 penalty ``l2 / 2 * ||w||^2`` (which makes the fit unique and finite when a judgement
    always wins), solved by Newton's method; ``Elo = 400 * w + 1000`` (the scaling of Wu et al. 2024, sec. 2.2, as
    in Chatbot Arena's Elo computation). A player with no battle gets 1000.

    Returns:
        ``[num_players]`` Elo scores (Python floats).
    """
    if not battles:
        return [1000.0] * num_players
    x = torch.zeros(2 * len(battles), num_players, dtype=torch.float64)
    y = torch.zeros(2 * len(battles), dtype=torch.float64)
    for row, (winner, loser) in enumerate(battles):
        x[2 * row, winner], x[2 * row, loser], y[2 * row] = 1.0, -1.0, 1.0
        x[2 * row + 1, winner], x[2 * row + 1, loser] = -1.0, 1.0
    w = torch.zeros(num_players, dtype=torch.float64)
    eye = torch.eye(num_players, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + l2 * w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + l2 * eye
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if float(step.abs().max()) < 1e-12:
            break
    return [400.0 * float(v) + 1000.0 for v in w]


def balance_meta_pairs(pairs: Sequence[dict], max_relative_pcnt: float) -> tuple[list[dict], list[dict]]:
    """Keep the meta pairs (each with a ``"class"``: the chosen judgement's score) so that no class exceeds
    ``max_relative_pcnt`` of the kept pairs: with ``C`` classes present, a class keeps at most
    ``max(1, floor(max_relative_pcnt * total))`` pairs where ``total`` is the number kept; solved by lowering the
    cap until it holds. Pairs keep their order; the earliest of a class are kept. Returns ``(kept, dropped)``.
    (Wu et al. 2024, sec. 2.3: the judge pairs are balanced over score classes.)"""
    counts: dict[Any, int] = {}
    for p in pairs:
        counts[p["class"]] = counts.get(p["class"], 0) + 1
    cap = max(counts.values(), default=0)
    while cap > 1:
        total = sum(min(c, cap) for c in counts.values())
        if cap <= max_relative_pcnt * total + 1e-9:
            break
        cap -= 1
    kept, dropped, seen = [], [], {}
    for p in pairs:
        seen[p["class"]] = seen.get(p["class"], 0) + 1
        (kept if seen[p["class"]] <= cap else dropped).append(p)
    return kept, dropped


def mix_meta_pairs(policy_pairs: Sequence[dict | None], meta_pairs: Sequence[dict], meta_judge_pcnt: float,
                   ) -> tuple[list[dict | None], int]:
    """Put meta pairs into a batch of policy pairs (None = a bad sample): they replace bad samples first, then policy
    pairs from the end of the batch, at most ``floor(meta_judge_pcnt * len(batch))`` of them (``< 0``: no cap).
    Returns ``(batch, meta pairs used)``; the unused ones stay for a later step."""
    batch = list(policy_pairs)
    cap = len(batch) if meta_judge_pcnt < 0 else int(math.floor(meta_judge_pcnt * len(batch) + 1e-9))
    slots = [i for i, p in enumerate(batch) if p is None] + [i for i in reversed(range(len(batch)))
                                                             if batch[i] is not None]
    used = min(cap, len(meta_pairs), len(slots))
    for n in range(used):
        batch[slots[n]] = dict(meta_pairs[n], meta=True)
    return batch, used


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------
class SelfRewardingTrainer(OnlineTrainer):
    """The self-rewarding / meta-rewarding loop (module docstring), with SFT validation on the reference answers,
    checkpoints, exact mid-iteration resume, logging and the HF export.

    Args:
        policy: an :class:`~nemo_aligner.models.alignable.AlignableModel` built with its reference policy, with
            ``generate``, ``get_logprobs``, ``reference_weights``, ``reset_reference_to_policy`` and
            ``reset_optimizer``, and a tokenizer (the judge reads and writes text).
        train_prompts, val_prompts: :class:`PromptWithAnswer` lists.
        sampling_params, length_params: the responses' (``model.spin``); judgements use the same sampling with
            ``judge_max_length`` new tokens.
        cfg: :class:`SelfRewardingConfig`.
        context: the run; checkpoints monitor ``val_loss`` (mode ``min``).
        max_seq_length: ``model.encoder_seq_length``: judge prompts are cut (:func:`~nemo_aligner.algorithms.llm_judge.fit_judge_prompt`) to
            ``max_seq_length - judge_max_length - 8`` tokens.
        judge: a separate judge for every judgement and meta-judgement instead of the policy (``judge_endpoint``:
            :class:`nemo_aligner.servers.openai_judge.OpenAIJudge`, or anything with its ``judge(texts, seeds,
            temperature, top_p, max_tokens, regex)``); it reads the rendered request texts, and with
            ``constrain_judge_output`` receives :func:`constrained_judgement_regex` (at most ``4 *
            judge_max_length`` characters of justification). None: the policy judges itself (the papers' setting).
        judge_model: a separate judge in this process (``judge_model_path``): a frozen
            :class:`~nemo_aligner.models.alignable.AlignableModel` with its own tokenizer that writes every judgement
            and meta-judgement through the same code as the policy would (``generate``, ``generate_choices``,
            ``get_logprobs``: the constrained judge works unchanged); the requests are rendered and cut with its
            tokenizer and chat template. Its weights never change, so checkpoints do not hold it. None: the policy.

    Checkpoints: the step (data position), the iteration, the pending meta pairs and the loop counters go in each
    checkpoint's extra state; the reference policy of iteration ``i > 0`` is the checkpoint
    ``<checkpoints>/iteration_starts/iteration=<i>`` written at the boundary (full fine-tuning: the weights; LoRA:
    only the adapters, the base is the pretrained model), which resume loads before the newest checkpoint.

    Raises:
        ConfigValueError: bad settings (:meth:`SelfRewardingConfig.check`), ``first_iteration_sft`` without answers,
            both ``judge`` and ``judge_model``, or a judge model without a tokenizer.
    """

    name = "self-rewarding"
    summary_keys = ["loss", "acc", "chosen_generated_rewards", "rejected_generated_rewards", "bad_samples_per_GBS",
                    "judge_parse_rate", "iteration"]
    timing_keys = {"generation": "time_generation", "judging": "time_judging", "training": "time_train"}
    val_summary_keys = ["loss"]
    export_role = "the policy"

    def __init__(self, policy: AlignableModel, train_prompts: Sequence[PromptWithAnswer],
                 val_prompts: Sequence[PromptWithAnswer] | None, sampling_params: Any, length_params: Any,
                 cfg: SelfRewardingConfig, context: RunContext, max_seq_length: int = 4096, judge: Any = None,
                 judge_model: AlignableModel | None = None):
        cfg.check(policy.data_parallel_size)
        if policy.tokenizer is None:
            raise ConfigValueError("self-rewarding needs a policy with a tokenizer (the judge reads text)")
        if judge is not None and judge_model is not None:
            raise ConfigValueError("model.spin.judge_endpoint and model.spin.judge_model_path are exclusive: set one "
                                   "separate judge")
        if judge_model is not None and judge_model.tokenizer is None:
            raise ConfigValueError("model.spin.judge_model_path: the judge model has no tokenizer (it reads text)")
        self.train_data = list(train_prompts)
        self.val_data = list(val_prompts or [])
        setup = RolloutSetup([p.prompt_ids for p in self.train_data], [p.prompt_ids for p in self.val_data],
                             sampling_params, length_params)
        super().__init__(policy, lambda p, r: [0.0] * len(p), setup, cfg, context, cfg.micro_batch_size)
        self.policy = policy
        self.max_steps, self.steps_per_epoch = compute_self_rewarding_max_steps(len(self.train_data), cfg)
        self.steps_per_iteration = self.steps_per_epoch * cfg.max_epochs
        if cfg.first_iteration_sft and any(p.answer_ids is None for p in self.train_data):
            raise ConfigValueError("model.spin.first_iteration_sft=true needs a reference answer for every training "
                                   "prompt (SFT formats or HH-RLHF transcripts, not bare {'prompt'} lines)")
        self.judge_template = cfg.llm_judge_prompt or DEFAULT_JUDGE_PROMPT
        self.meta_template = cfg.llm_meta_judge_prompt or DEFAULT_META_JUDGE_PROMPT
        self.judge_regex = build_reward_regex(cfg.judge_reward_regex, SCORE_PATTERN)
        self.meta_regex = build_reward_regex(cfg.meta_judge_reward_regex, WINNER_PATTERN)
        self.judge_prompt_budget = max(int(max_seq_length) - cfg.judge_max_length - 8, 16)
        self.judge_length = dataclasses.replace(length_params, max_length=cfg.judge_max_length,
                                                min_length=min(length_params.min_length, cfg.judge_max_length))
        self.score_strings = [str(s) for s in range(int(cfg.judge_score_low), int(cfg.judge_score_high) + 1)]
        self.external_judge = judge
        self.judge_policy = judge_model if judge_model is not None else policy  # who writes the judgements
        self.judge_tokenizer = self.judge_policy.tokenizer
        self.iteration = 0
        self.meta_buffer: list[dict] = []
        self.last_pairs: list[dict] = []
        self.stop_ids = self._stop_ids(policy)
        self.judge_stop_ids = self._stop_ids(self.judge_policy)

    @staticmethod
    def _stop_ids(model: AlignableModel) -> set[int]:
        ids = set(model.eos_token_ids())
        if model.tokenizer.eos_token_id is not None:
            ids.add(int(model.tokenizer.eos_token_id))
        return ids

    # ---- text helpers ------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, add_special_tokens=False)

    def _text(self, ids: Sequence[int]) -> str:
        """The text of generated ids without the end-of-sequence tokens."""
        return self.tokenizer.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)

    def _judge_encode(self, text: str) -> list[int]:
        """``text`` in the judge's tokens (the policy's, unless a ``judge_model`` judges)."""
        return encode(self.judge_tokenizer, text, add_special_tokens=False)

    def _judge_text(self, ids: Sequence[int]) -> str:
        """The text of the judge's generated ids without its end-of-sequence tokens."""
        return self.judge_tokenizer.decode([i for i in ids if i not in self.judge_stop_ids], skip_special_tokens=True)

    def _chat_ids(self, text: str, tokenizer: Any = None) -> list[int]:
        """A judge request as a prompt of ``tokenizer`` (default: the policy's): :func:`judge_request_ids`."""
        return judge_request_ids(text, tokenizer or self.tokenizer)

    def judge_prompt_text(self, template: str, fields: dict[str, str]) -> str:
        """The text of a judge (or meta-judge) request (the user turn), cut to fit in the judge's tokens
        (:func:`fit_judge_request`)."""
        return fit_judge_request(template, fields, self.judge_tokenizer, self.judge_prompt_budget)

    # ---- the judge ---------------------------------------------------------------------------------------------
    def _judge_inference(self):
        """A separate ``judge_model``'s inference mode (gradients off); nothing more when the policy judges."""
        if self.judge_policy is self.policy:
            return contextlib.nullcontext()
        return self.judge_policy.inference()

    def _sampled_judgements(self, texts: list[str], seeds: list[int], prefix: str, choices: list[str],
                            ) -> list[str]:
        """One judgement text per request text. A separate judge (``judge``): its answers. Unconstrained: free
        generation of ``judge_max_length`` tokens. Constrained (``constrain_judge_output``):
        :meth:`constrained_judgements`."""
        if self.external_judge is not None:
            return self.external_judgements(texts, seeds, prefix, choices)
        requests = [self._chat_ids(t, self.judge_tokenizer) for t in texts]
        if self.cfg.constrain_judge_output:
            return self.constrained_judgements(requests, seeds, prefix, choices)
        texts = []
        size = self.cfg.rollout_micro_batch_size
        sampling = dataclasses.replace(self.sampling_params, end_strings=[])  # the score comes last: no early stop
        for start in range(0, len(requests), size):
            out = self.judge_policy.generate(requests[start:start + size], sampling, self.judge_length,
                                             seeds=seeds[start:start + size])
            texts += [self._judge_text(ids) for ids in out.response_ids]
        return texts

    def constrained_judgements(self, requests: list[list[int]], seeds: list[int], prefix: str, choices: list[str],
                               ) -> list[str]:
        """Judgements that always parse, through the alignable interface only:

        1. a bounded justification: at most ``judge_max_length`` tokens, stopped at ``prefix`` (its only end string;
           the responses' end strings do not apply to judgements);
        2. the text is cut before ``prefix`` (if generated) and ``prefix`` is appended (e.g. ``"Score: "``);
        3. the verdict is one of ``choices`` (the score strings ``judge_score_low..judge_score_high``, or ``A``/``B``
           for the meta-judge) after ``request + justification + prefix``: with a vLLM engine, decoded under vLLM's
           structured outputs (``generate_choices``: a grammar that admits only those strings, the row's seed, the
           prefix cache reusing the request); with the native engine, picked by the policy's log-probabilities of
           each candidate continuation (``get_logprobs`` on ``request + justification + prefix + candidate``):
           sampled from their softmax (divided by the temperature) with a generator seeded by the row's seed, or
           the arg-max when greedy.

        Returns the judgement texts ``justification + prefix + choice``.
        """
        sampling = dataclasses.replace(self.sampling_params, end_strings=[prefix.strip()])
        size = self.cfg.rollout_micro_batch_size
        justifications: list[str] = []
        for start in range(0, len(requests), size):
            out = self.judge_policy.generate(requests[start:start + size], sampling, self.judge_length,
                                             seeds=seeds[start:start + size])
            justifications += [close_justification(self._judge_text(ids), prefix) for ids in out.response_ids]
        contexts = [list(req) + self._judge_encode(just + prefix) for req, just in zip(requests, justifications)]
        picks = None
        for start in range(0, len(contexts), size):  # the engine's structured outputs, when it has them
            chunk = self.judge_policy.generate_choices(contexts[start:start + size], list(choices),
                                                       self.sampling_params, seeds[start:start + size])
            if chunk is None:
                break
            picks = (picks or []) + chunk
        if picks is None:  # the native engine: the choices' log-probabilities from the trainer
            scores = self.candidate_logprobs(contexts, [self._judge_encode(c) for c in choices])
            picks = []
            for r, seed in enumerate(seeds):
                if self.sampling_params.is_greedy:
                    picks.append(int(scores[r].argmax()))
                else:
                    probs = torch.softmax(scores[r] / self.sampling_params.temperature, dim=0)
                    generator = torch.Generator().manual_seed(int(seed) & (2**63 - 1))
                    picks.append(int(torch.multinomial(probs, 1, generator=generator)))
        return [justifications[r] + prefix + choices[pick] for r, pick in enumerate(picks)]

    def external_judgements(self, texts: list[str], seeds: list[int], prefix: str, choices: list[str]) -> list[str]:
        """The separate judge's answers: free text of at most ``judge_max_length`` tokens, or constrained
        (``constrain_judge_output``) to :func:`constrained_judgement_regex` with ``4 * judge_max_length``
        characters of justification."""
        sampling = self.sampling_params
        temperature = 0.0 if sampling.is_greedy else float(sampling.temperature)
        regex, max_tokens = None, self.cfg.judge_max_length
        if self.cfg.constrain_judge_output:
            chars = 4 * self.cfg.judge_max_length
            regex = constrained_judgement_regex(prefix, choices, chars)
            max_tokens = constrained_judgement_max_tokens(prefix, choices, chars)
        return self.external_judge.judge(texts, seeds, temperature, float(sampling.top_p), max_tokens, regex)

    def candidate_logprobs(self, contexts: list[list[int]], choice_ids: list[list[int]]) -> torch.Tensor:
        """``[len(contexts), len(choice_ids)]`` float64: the judge's ``log pi(choice | context)`` summed over the choice's
        tokens, from ``get_logprobs``. When every choice is one token (the digits 0-9, ``A``/``B`` in most
        tokenizers) one forward per context gives them all: the batch asks for every choice as a target at the
        context's last position. Otherwise each ``context + choice`` is its own sequence."""
        size = self.cfg.rollout_micro_batch_size
        num = len(choice_ids)
        out = torch.zeros(len(contexts), num, dtype=torch.float64)
        if all(len(c) == 1 for c in choice_ids):
            firsts = torch.tensor([c[0] for c in choice_ids], dtype=torch.long)
            for start in range(0, len(contexts), size):
                chunk = contexts[start:start + size]
                batch = collate_sequences([{"input_ids": ctx + choice_ids[0], "prompt_length": len(ctx)}
                                           for ctx in chunk], self.judge_policy.pad_token_id)
                batch = dataclasses.replace(
                    batch, pred_row=batch.pred_row.repeat_interleave(num), pred_col=batch.pred_col.repeat_interleave(num),
                    targets=firsts.repeat(len(chunk)), seq_id=torch.arange(len(chunk)).repeat_interleave(num))
                out[start:start + len(chunk)] = self.judge_policy.get_logprobs(batch).detach().double().cpu().view(-1, num)
            return out
        rows = [(r, c) for r in range(len(contexts)) for c in range(num)]
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            batch = collate_sequences([{"input_ids": contexts[r] + choice_ids[c], "prompt_length": len(contexts[r])}
                                       for r, c in chunk], self.judge_policy.pad_token_id)
            token_logprobs = self.judge_policy.get_logprobs(batch).detach().double().cpu()
            sums = torch.zeros(len(chunk), dtype=torch.float64).index_add(0, batch.seq_id.cpu(), token_logprobs)
            for (r, c), value in zip(chunk, sums.tolist()):
                out[r, c] = value
        return out

    def judge(self, prompt_texts: list[str], response_texts: list[str], seed: int, prompt_indices: list[int],
              num_per_prompt: int) -> tuple[list[list[str]], list[list[float | None]], list[list[int]]]:
        """``k`` judgements of every response (``response_texts`` prompt-major, ``num_per_prompt`` per prompt):
        ``(texts, scores (None: dropped), request ids)``, each ``[responses][k]`` (requests: ``[responses]``)."""
        k = self.cfg.num_evals_to_average
        request_texts = [self.judge_prompt_text(self.judge_template, {"prompt": prompt_texts[i // num_per_prompt],
                                                                      "response": response})
                         for i, response in enumerate(response_texts)]
        requests = [self._chat_ids(t) for t in request_texts]
        flat_requests = [request_texts[i] for i in range(len(requests)) for _ in range(k)]
        flat_seeds = [response_seed(seed + 1, prompt_indices[i // num_per_prompt], (i % num_per_prompt) * k + e)
                      for i in range(len(requests)) for e in range(k)]
        texts = self._sampled_judgements(flat_requests, flat_seeds, self.cfg.judge_score_prefix, self.score_strings)
        low, high = self.cfg.judge_score_low, self.cfg.judge_score_high
        scores = [parse_score(t, self.judge_regex, low, high) for t in texts]
        return ([texts[i * k:(i + 1) * k] for i in range(len(requests))],
                [scores[i * k:(i + 1) * k] for i in range(len(requests))], requests)

    def meta_judge(self, prompt_text: str, response_text: str, request_ids: list[int], judgements: list[str],
                   scores: list[float | None], seed: int, prompt_index: int) -> tuple[dict | None, int, int]:
        """A meta pair from one response's judgements: every pair of judgements with different valid scores, shown
        in both orders with the score text stripped; the verdicts give Bradley-Terry Elo scores
        (:func:`bradley_terry_elo`); chosen = best Elo, rejected = worst (None on a tie or no verdict).
        Returns ``(pair or None, verdicts asked, verdicts parsed)``."""
        valid = [j for j, s in enumerate(scores) if s is not None]
        games = [(a, b) for a, b in itertools.combinations(valid, 2) if scores[a] != scores[b]]
        if not games:
            return None, 0, 0
        shown = [(a, b) for a, b in games] + [(b, a) for a, b in games]
        requests = [self.judge_prompt_text(self.meta_template, {
            "prompt": prompt_text, "response": response_text,
            "judgement_a": strip_score(judgements[a], self.judge_regex),
            "judgement_b": strip_score(judgements[b], self.judge_regex)}) for a, b in shown]
        seeds = [response_seed(seed + 2, prompt_index, n) for n in range(len(shown))]
        texts = self._sampled_judgements(requests, seeds, self.cfg.meta_judge_score_prefix, ["A", "B"])
        battles = []
        for (a, b), text in zip(shown, texts):
            winner = parse_winner(text, self.meta_regex)
            if winner is not None:
                battles.append((a, b) if winner == "A" else (b, a))
        if not battles:
            return None, len(shown), 0
        elo = bradley_terry_elo(len(judgements), battles)
        ranked = sorted(valid, key=lambda j: (-elo[j], j))
        best, worst = ranked[0], ranked[-1]
        if abs(elo[best] - elo[worst]) < 1e-9:
            return None, len(shown), len(battles)
        pair = {"prompt_ids": list(request_ids), "chosen_ids": self._encode(judgements[best]) or [0],
                "rejected_ids": self._encode(judgements[worst]) or [0], "class": scores[best],
                "chosen_score": elo[best], "rejected_score": elo[worst]}
        return pair, len(shown), len(battles)

    # ---- one step ----------------------------------------------------------------------------------------------
    def _sampler_step(self, step: int) -> int:
        """The sampler's step for loop step ``step``: epoch ``step // steps_per_epoch`` (reshuffled), batch
        ``step % steps_per_epoch`` of it (``limit_train_batches`` may make epochs shorter than the data)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch * self.sampler.steps_per_epoch + within

    def step_prompt_indices(self) -> list[int]:
        return [i for mb in self.sampler.micro_batches(self._sampler_step(self.step)) for i in mb]

    def rollout_pairs(self, indices: list[int], seed: int, rho: float) -> tuple[list[dict | None], dict[str, float]]:
        """Steps 1-4 for this rank's prompts ``indices``: one pair (or None, a bad sample) per prompt, with the meta
        pairs mixed in (``use_meta_judge``); returns ``(pairs, metrics)``."""
        cfg, n = self.cfg, self.cfg.num_responses_to_gen
        prompts = [self.train_data[i].prompt_ids for i in indices]
        texts = [self.train_data[i].prompt_text for i in indices]
        start = time.perf_counter()
        with self.policy.reference_weights():
            rollouts = self.generate_rollouts(prompts, n, self.sampling_params, cfg.rollout_micro_batch_size, seed,
                                              prompt_indices=indices)
            t_gen = time.perf_counter() - start
            responses, ended = rollouts.responses(), rollouts.ended.tolist()
            response_texts = [self._text(r) for r in responses]
            t0 = time.perf_counter()
            with self.policy.inference(), self._judge_inference():
                judgements, scores, requests = self.judge(texts, response_texts, seed, indices, n)
                pairs: list[dict | None] = []
                new_meta, asked, parsed = [], 0, 0
                bad_ends = 0
                for p in range(len(indices)):
                    rows = range(p * n, (p + 1) * n)
                    stats = [aggregate_scores(scores[r]) for r in rows]
                    bad_ends += sum(1 for r in rows if not ended[r])
                    candidates = [Candidate(stats[j][0], stats[j][1], len(responses[r]), ended[r], tuple(responses[r]))
                                  for j, r in enumerate(rows)]
                    picked = select_pair(candidates, rho)
                    if picked is None:
                        pairs.append(None)
                    else:
                        c, r = picked
                        pairs.append({"prompt_ids": prompts[p], "chosen_ids": responses[p * n + c],
                                      "rejected_ids": responses[p * n + r], "chosen_score": candidates[c].score,
                                      "rejected_score": candidates[r].score,
                                      # the judge's scores are the ground-truth rewards of the RPO losses
                                      "chosen_reward": candidates[c].score, "rejected_reward": candidates[r].score})
                    if cfg.use_meta_judge:
                        variances = [s[1] if s[1] is not None else -1.0 for s in stats]
                        j = max(range(n), key=lambda j: (variances[j], -j))
                        if variances[j] > 0:
                            meta, a, b = self.meta_judge(texts[p], response_texts[p * n + j], requests[p * n + j],
                                                         judgements[p * n + j], scores[p * n + j], seed, indices[p])
                            asked, parsed = asked + a, parsed + b
                            if meta is not None:
                                new_meta.append(meta)
        t_judge = time.perf_counter() - t0
        flat_scores = [s for row in scores for s in row]
        metrics = {"time_generation": t_gen, "time_judging": t_judge,
                   # seconds spent copying weights into a vLLM engine (0 with the native engine)
                   "time_refit": self.policy.pop_generation_metrics().get("time_refit", 0.0),
                   "judge_parse_rate": sum(s is not None for s in flat_scores) / max(len(flat_scores), 1),
                   "bad_samples_per_GBS": sum(p is None for p in pairs) / max(len(pairs), 1),
                   "bad_ends_per_GBS": bad_ends / max(len(responses), 1)}
        if cfg.use_meta_judge:
            kept, _ = balance_meta_pairs(self.meta_buffer + new_meta, cfg.meta_max_relative_pcnt)
            pairs, used = mix_meta_pairs(pairs, kept, cfg.meta_judge_pcnt)
            self.meta_buffer = kept[used:]
            metrics.update({"meta_pairs_per_GBS": used / max(len(pairs), 1), "meta_buffer": float(len(self.meta_buffer)),
                            "meta_judge_parse_rate": parsed / asked if asked else float("nan")})
        return pairs, metrics

    def train_on_pairs(self, pairs: list[dict | None], loss_cfg: DPOLossConfig) -> dict[str, float]:
        """One optimizer step of the DPO-family loss (:func:`~nemo_aligner.algorithms.dpo.dpo_loss_and_metrics`)
        over the good pairs of all ranks: micro-batches of ``micro_batch_size`` good pairs, each weighted by its
        pair count over the global count (so the loss is the mean over the good pairs); bad samples are masked out.
        A rank without a good pair runs one zero-weight micro-batch (so every rank takes part in the step)."""
        good = [p for p in pairs if p is not None]
        total = float(self.policy.all_reduce(torch.tensor(float(len(good)), device=self.policy.device), "sum"))
        world = self.policy.data_parallel_size
        mbs = self.cfg.micro_batch_size
        micro = [good[i:i + mbs] for i in range(0, len(good), mbs)]
        weights = [len(m) * world for m in micro]
        if not micro:
            dummy = next((p for p in pairs if p is not None), None) or {
                "prompt_ids": self.train_data[0].prompt_ids, "chosen_ids": [self.policy.pad_token_id],
                "rejected_ids": [self.policy.pad_token_id]}
            micro, weights = [[dummy]], [0.0]
        pad = self.policy.pad_token_id

        def loss_fn(chunk: list[dict]):
            batch = collate_preference_pairs(chunk, pad)
            logprobs = self.policy.get_logprobs(batch)
            ref = self.policy.get_logprobs(batch, reference=True)
            from_ref = torch.zeros(2 * batch.num_pairs, dtype=ref.dtype, device=ref.device).index_add(
                0, batch.seq_id.to(ref.device), ref)
            return dpo_loss_and_metrics(logprobs, from_ref, batch, loss_cfg)

        sums, info = optimizer_step(self.policy, micro, loss_fn, weights, max(total, 1.0))
        metrics = self.policy.all_reduce_mean(sums)
        metrics.update(info)
        chosen = [p["chosen_score"] for p in good if not p.get("meta")]
        rejected = [p["rejected_score"] for p in good if not p.get("meta")]
        metrics["chosen_generated_rewards"] = sum(chosen) / len(chosen) if chosen else float("nan")
        metrics["rejected_generated_rewards"] = sum(rejected) / len(rejected) if rejected else float("nan")
        metrics["reject_lengths"] = metrics.pop("rejected_lengths", float("nan"))
        metrics["pairs_trained"] = total
        return metrics

    def train_on_answers(self, indices: list[int]) -> dict[str, float]:
        """``first_iteration_sft``: one optimizer step of SFT (token-mean NLL) on the step's reference answers."""
        rows = [{"input_ids": self.train_data[i].prompt_ids + self.train_data[i].answer_ids,
                 "prompt_length": len(self.train_data[i].prompt_ids)} for i in indices]
        micro = [rows[i:i + self.cfg.micro_batch_size] for i in range(0, len(rows), self.cfg.micro_batch_size)]
        pad = self.policy.pad_token_id

        def loss_fn(chunk):
            batch = collate_sequences(chunk, pad)
            loss, metrics = sft_loss_and_metrics(self.policy.get_logprobs(batch), batch)
            return loss, {"loss": metrics["loss"], "sft_loss": metrics["loss"]}

        sums, info = optimizer_step(self.policy, micro, loss_fn, [1.0] * len(micro), len(micro))
        metrics = self.policy.all_reduce_mean(sums)
        metrics.update(info)
        return metrics

    def train_step(self):
        """Run step ``self.step`` of iteration ``self.iteration``; returns ``(metrics averaged over ranks, None)``."""
        cfg = self.cfg
        seed = self._step_seed(self.step)
        start = time.perf_counter()
        indices = self.step_prompt_indices()
        metrics: dict[str, float]
        if cfg.first_iteration_sft and self.iteration == 0:
            t0 = time.perf_counter()
            metrics = self.train_on_answers(indices)
            metrics.update({"time_generation": 0.0, "time_judging": 0.0, "time_train": time.perf_counter() - t0})
            self.last_pairs = []
        else:
            rho = value_for_iteration(cfg.length_control, self.iteration)
            pairs, rollout_metrics = self.rollout_pairs(indices, seed, rho)
            t0 = time.perf_counter()
            metrics = self.train_on_pairs(pairs, cfg.loss_config(self.iteration))
            metrics["time_train"] = time.perf_counter() - t0
            metrics.update(rollout_metrics)
            metrics["beta"] = value_for_iteration(cfg.ref_policy_kl_penalty, self.iteration)
            metrics["length_control"] = rho
            self.last_pairs = [p for p in pairs if p is not None]
        metrics["iteration"] = float(self.iteration)
        metrics["step_time"] = time.perf_counter() - start
        return self.policy.all_reduce_mean(metrics), None

    # ---- iteration boundary ------------------------------------------------------------------------------------
    def _iteration_start_dir(self, iteration: int) -> Path:
        return self.context.checkpoints.directory / "iteration_starts" / f"iteration={iteration}"

    def end_iteration(self) -> None:
        """After the last step of an iteration: the reference becomes the current policy, the optimizer moments and
        step are reset, the next iteration begins (its beta and rho apply from its first step), and the new
        reference is checkpointed to ``iteration_starts/iteration=<i>`` for resume."""
        self.policy.reset_reference_to_policy()
        self.policy.reset_optimizer()
        self.iteration += 1
        self.meta_buffer = []  # meta pairs judged by the previous iteration's model are not carried over
        if self.step < self.max_steps:
            self.policy.save_checkpoint(str(self._iteration_start_dir(self.iteration)),
                                        {"step": self.step, "iteration": self.iteration, "consumed_samples": 0})
            if self.context.is_global_zero:  # the previous iteration's is kept: an older checkpoint may need it
                for old in self._iteration_start_dir(0).parent.glob("iteration=*"):
                    if int(old.name.split("=")[1]) < self.iteration - 1:
                        shutil.rmtree(old, ignore_errors=True)
        if self.context.is_global_zero:
            self.log.info(f"iteration {self.iteration} begins at step {self.step}: reference policy = current policy, "
                          "optimizer state reset")

    # ---- validation and samples --------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """The SFT loss (token-mean NLL) of the policy on the validation prompts' reference answers (at most
        ``limit_val_batches`` batches of ``micro_batch_size``; an int: batches, a float: a fraction), and the sample
        table of the last step's pairs (``<log_dir>/val_samples/step=<N>.md``). Empty without answers."""
        rows = [{"input_ids": p.prompt_ids + p.answer_ids, "prompt_length": len(p.prompt_ids)}
                for p in self.val_data if p.answer_ids]
        rank, world = self.policy.data_parallel_rank, self.policy.data_parallel_size
        limit = self.cfg.limit_val_batches
        mbs = self.cfg.micro_batch_size
        batches = [rows[i:i + mbs] for i in range(0, len(rows), mbs)]
        keep = int(limit) if isinstance(limit, int) and limit >= 0 else int(math.ceil(len(batches) * float(limit)))
        batches = batches[:keep][rank::world]
        tokens = loss_sum = 0.0
        with self.policy.inference():
            for chunk in batches:
                batch = collate_sequences(chunk, self.policy.pad_token_id)
                logprobs = self.policy.get_logprobs(batch)
                loss_sum += float(-logprobs.sum())
                tokens += float(logprobs.numel())
        totals = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=self.policy.device)
        if world > 1:
            totals = self.policy.all_reduce(totals, "sum")
        if self.context.is_global_zero:
            self.write_pair_samples()
        loss_sum, tokens = totals.tolist()
        return {"loss": loss_sum / tokens} if tokens else {}

    def write_pair_samples(self) -> Path | None:
        """Write ``<log_dir>/val_samples/step=<N>.md``: prompt, chosen, rejected and their scores for the first
        ``num_val_samples_to_show`` pairs of the last step (meta pairs marked); the same rows go to
        ``context.log_table`` as ``val/pairs`` (a W&B table when W&B is on)."""
        if not self.last_pairs:
            return None
        cell = lambda text: text.replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
        lines = [f"# self-rewarding pairs, step {self.step} (iteration {self.iteration})", "",
                 "| # | kind | prompt | chosen | rejected | chosen score | rejected score |",
                 "|---|---|---|---|---|---|---|"]
        rows = [["meta" if p.get("meta") else "policy", self._text(p["prompt_ids"])[-300:], self._text(p["chosen_ids"]),
                 self._text(p["rejected_ids"]), float(p["chosen_score"]), float(p["rejected_score"])]
                for p in self.last_pairs[: self.cfg.num_val_samples_to_show]]
        for i, (kind, prompt, chosen, rejected, chosen_score, rejected_score) in enumerate(rows):
            lines.append(f"| {i} | {kind} | {cell(prompt)} | {cell(chosen)} | {cell(rejected)} | {chosen_score:.4g} | "
                         f"{rejected_score:.4g} |")
        out = self.context.log_dir / "val_samples" / f"step={self.step:07d}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        self.context.log_table("val/pairs", ["kind", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"],
                               rows, self.step)
        return out

    # ---- loop ----------------------------------------------------------------------------------------------------
    def _counters(self) -> dict[str, Any]:
        """The iteration and the pending meta pairs (judged, not yet trained on), saved with each checkpoint."""
        return {"iteration": self.iteration, "meta_buffer": [dict(p) for p in self.meta_buffer]}

    def _restore(self, extra: dict) -> None:
        self.iteration = int(extra.get("iteration", self.step // self.steps_per_iteration))
        self.meta_buffer = [dict(p) for p in extra.get("meta_buffer", [])]

    def _maybe_resume(self) -> None:
        """Resume as :class:`~nemo_aligner.algorithms.base.TrainingLoop` does, after loading the reference policy of
        the resumed iteration: when the newest checkpoint is in iteration ``i > 0``,
        ``iteration_starts/iteration=<i>`` is loaded first and made the reference.

        Raises:
            DamagedCheckpointError: the iteration's reference checkpoint is missing.
        """
        valid = self.context.checkpoints.checkpoints() if self.context.resume else []
        if valid:
            iteration = int(valid[-1][1].get("iteration", 0))
            if iteration > 0:
                start = self._iteration_start_dir(iteration)
                if not (start / "state.pt").is_file():
                    raise DamagedCheckpointError(f"cannot resume iteration {iteration}: its reference policy "
                                                 f"{start} is missing")
                self.policy.load_checkpoint(str(start))
                self.policy.reset_reference_to_policy()
        super()._maybe_resume()

    def _logged_counters(self) -> dict[str, float]:
        return {}  # the iteration is in every step's metrics; the meta buffer is checkpointed, not logged

    def _after_step(self) -> None:
        """End the iteration after every ``steps_per_epoch * max_epochs`` steps (:meth:`end_iteration`), before that
        step's validation and checkpoint, except after the last iteration."""
        if self.step % self.steps_per_iteration == 0 and self.iteration + 1 < self.cfg.max_iterations:
            self.end_iteration()
