"""The training loop every offline algorithm shares (DPO, SFT, reward models), and the loop steps every trainer shares.

A subclass of :class:`BaseTrainer` only says how a micro-batch becomes a loss and metrics
(:meth:`BaseTrainer.loss_and_metrics`); the loop owns micro-batching and gradient accumulation, validation,
checkpoints, exact resume, logging and the HF export. It talks to the model only through
:class:`~nemo_aligner.models.alignable.AlignableModel`.

:class:`TrainingLoop` holds the steps that the offline loop and the online loops
(:class:`nemo_aligner.algorithms.online.OnlineTrainer`: PPO, rejection sampling) have in common: the checkpoint with
its data position, exact resume, logging a validation and the HF export. Every trainer receives a
:class:`RunContext` (the run directory, checkpoints, metrics sink, resume / export / rank-0 flags): the plumbing
the loops share is that one object, composed in, not constructor arguments repeated by every subclass.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nemo_aligner.data.samplers import GlobalBatchSampler, sequential_batches
from nemo_aligner.errors import DiskError, UserError
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.utils.checkpoint import CheckpointManager, DamagedCheckpointError, NonFiniteError, step_of_name
from nemo_aligner.utils.config import ConfigValueError, config_schema, dataclass_from_sections, key
from nemo_aligner.utils.fs import disk_problem
from nemo_aligner.utils.logging import format_metrics, get_logger, trim_csv_log


def _discard_metrics(metrics: dict, step: int) -> None:
    """The default metrics sink: logs nothing."""


def _discard_table(key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
    """The default table sink: logs nothing."""


@dataclass
class RunContext:
    """Where a training run writes and how it reports: what every trainer's loop receives besides its model, data
    and algorithm config (the recipes build it with :func:`nemo_aligner.recipes.common.run_context`).

    Fields:
        log_dir: the run directory (``hf_export/``, ``val_samples/`` and ``csv/`` go here); a ``str`` is made a
            :class:`~pathlib.Path`.
        checkpoints: the checkpoint naming and top-k bookkeeping of ``<log_dir>/checkpoints``.
        log_metrics: ``(dict, step) -> None`` sink for TensorBoard/CSV (the recipes pass ``fabric.log_dict``);
            default: nothing is logged.
        log_table: ``(key, columns, rows, step) -> None`` sink for sample tables (the recipes pass
            :func:`nemo_aligner.utils.logging.table_sink`, which writes W&B tables when W&B is on); default: nothing.
        resume: restore the newest valid checkpoint in ``checkpoints`` when there is one.
        export_hf: write ``<log_dir>/hf_export`` at the end.
        is_global_zero: whether this process prints, shows progress and writes files meant once per run.
    """

    log_dir: Path
    checkpoints: CheckpointManager
    log_metrics: Callable[[dict, int], None] = _discard_metrics
    log_table: Callable[[str, list[str], list[list[Any]], int], None] = _discard_table
    resume: bool = True
    export_hf: bool = True
    is_global_zero: bool = True

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir)


@config_schema("gpt_dpo", trainer="trainer.dpo", batch="model", model="model")
@config_schema("training_rm", trainer="trainer.rm", batch="model", model="model")
@config_schema("gpt_sft", trainer="trainer.sft", batch="model.data.train_ds", model=None)
@dataclass
class TrainerConfig:
    """The ``trainer.<algorithm>`` section plus batch sizes (NeMo-Aligner key names): the type and default of each
    key, registered in the structured configs of ``gpt_dpo``, ``training_rm`` and ``gpt_sft``
    (:func:`~nemo_aligner.utils.config.config_schema`). Sections: ``trainer`` = ``trainer.<algorithm>``, ``batch``
    = where the recipe keeps its batch sizes (``model``; SFT: ``model.data.train_ds``), ``model`` = ``model``
    (``seed``; SFT reads its seed from ``batch``, which has none, so SFT keeps the default)."""

    max_epochs: int = key("trainer", 1)
    max_steps: int = key("trainer", -1)
    val_check_interval: int = key("trainer", 100)
    save_interval: int = key("trainer", 100)
    limit_val_batches: int | float = key("trainer", 1.0)  # int: batches, float: fraction of the validation set
    gradient_clip_val: float = key("trainer", 1.0)
    global_batch_size: int = key("batch", 8)
    micro_batch_size: int = key("batch", 1)
    seed: int = key("model", 1234)

    @classmethod
    def from_cfg(cls, trainer_section: Any, model_section: Any) -> "TrainerConfig":
        """From ``trainer.<algorithm>`` (epochs, steps, intervals, clipping) and ``model`` (batch sizes, seed); an
        absent key takes the field's default.

        Raises:
            ConfigValueError: a value that is not of its field's type (``2.5`` for an integer is never truncated).
        """
        return dataclass_from_sections(cls, {"trainer": trainer_section, "batch": model_section, "model": model_section})


def compute_max_steps(num_samples: int, cfg: TrainerConfig) -> int:
    """Optimizer steps of a run: ``max_epochs`` epochs of ``num_samples // global_batch_size`` steps, capped by
    ``max_steps`` unless it is negative (NeMo-Aligner's convention).

    Raises:
        ValueError: the result is 0 (too few samples for one global batch, or ``max_steps=0``).
    """
    epoch_steps = cfg.max_epochs * (num_samples // cfg.global_batch_size)
    steps = epoch_steps if cfg.max_steps < 0 else min(cfg.max_steps, epoch_steps)
    if steps < 1:
        raise ConfigValueError(
            f"nothing to train: {num_samples} samples, global_batch_size={cfg.global_batch_size}, "
            f"max_epochs={cfg.max_epochs}, max_steps={cfg.max_steps} give 0 optimizer steps"
        )
    return steps


def optimizer_step(
    model: AlignableModel,
    micro_batches: Sequence[Any],
    loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, Any]]],
    weights: Sequence[float],
    denominator: float = 1.0,
) -> tuple[dict[str, float], dict[str, float]]:
    """One optimizer step of ``model`` over this rank's ``micro_batches``, with explicit loss weights.

    Micro-batch ``i`` contributes ``weights[i] / denominator`` of the step: its loss is back-propagated as
    ``(loss_i * weights[i]) / denominator`` (inside ``model.accumulate``, gradients reduced across data-parallel
    ranks on the last one) and each of its metrics enters the returned sums as ``(value * weights[i]) /
    denominator``. The trainers choose the weights:

    * offline trainers (DPO, SFT, reward models) and rejection sampling: the mean over micro-batches, ``weights =
      [1] * n``, ``denominator = n`` (each micro-batch's loss is already its own mean);
    * the PPO actor and critic: the token-weighted mean over the global batch, ``weights[i]`` = micro-batch ``i``'s
      share of the global batch's (kept) response tokens, ``denominator = 1``.

    Multiplying by 1 and dividing by 1 are exact in floating point, so each weighting gives the same bits as
    writing ``loss / n`` or ``loss * share`` by hand.

    Args:
        model: the model being trained (``prepare_for_training_step`` ... ``finish_training_step``).
        micro_batches: this rank's micro-batches, in order (anything ``loss_fn`` takes, e.g. index lists).
        loss_fn: ``micro_batch -> (scalar loss with grad, {name: scalar})``, called inside the accumulation
            context; metrics may be tensors or floats.
        weights: one weight per micro-batch.
        denominator: what every weighted loss and metric is divided by.

    Returns:
        ``(metric sums, step info)``: the weighted sums of the micro-batch metrics on this rank (not reduced over
        ranks), and what ``finish_training_step`` returned (``grad_norm``, ``lr``).

    Raises:
        ValueError: ``weights`` and ``micro_batches`` differ in length.
    """
    if len(weights) != len(micro_batches):
        raise ValueError(f"{len(micro_batches)} micro-batches but {len(weights)} loss weights")
    model.prepare_for_training_step()
    sums: dict[str, float] = {}
    n = len(micro_batches)
    for i, (micro_batch, weight) in enumerate(zip(micro_batches, weights)):
        with model.accumulate(is_last=i == n - 1):
            loss, metrics = loss_fn(micro_batch)
            model.backward(loss * weight / denominator)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value) * weight / denominator
    return sums, model.finish_training_step()


class TrainingLoop:
    """Checkpoint, resume, validation-logging and export steps shared by every trainer.

    Args:
        model: the :class:`~nemo_aligner.models.alignable.AlignableModel` being trained, whose checkpoints these are.
        context: the run's directory, checkpoints, metrics sink and flags (:class:`RunContext`).

    A subclass also sets ``sampler`` (for ``steps_per_epoch``) and ``max_steps``, and implements :meth:`validate`
    and :attr:`samples_per_step`. The loop state starts at ``step = 0`` with empty ``last_val_metrics`` and
    ``history``.
    """

    #: Progress-bar label (also names the step unit in log lines).
    name = "train"
    #: Metrics of the one-line validation summary (None: all of them, in their order).
    val_summary_keys: list[str] | None = None
    #: What the HF export holds, for its log line (``"the actor"``); empty: not named.
    export_role = ""

    def __init__(self, model: AlignableModel, context: RunContext):
        self.model = model
        self.context = context
        self.step = 0
        self.last_val_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.log = get_logger()

    @property
    def samples_per_step(self) -> int:
        """Samples (examples, or prompts) one step consumes over all ranks: ``consumed_samples = step * this``."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Validation metrics (averaged over ranks); empty when there is nothing to validate."""
        raise NotImplementedError

    def _counters(self) -> dict[str, int]:
        """Loop counters besides ``step`` that a checkpoint stores and resume restores (none by default)."""
        return {}

    def _restore(self, extra: dict) -> None:
        """Restore what :meth:`_counters` (or a subclass's save) stored, from the resumed checkpoint's extra state."""

    def _save(self) -> None:
        """Checkpoint the model with the data position (step, epoch, consumed samples), :meth:`_counters` and the
        last validation metrics (``val_<name>``, what ``checkpoint_callback_params.monitor`` ranks); rank 0 then
        prunes to the top-k."""
        extra = {
            "step": self.step,
            **self._counters(),
            "consumed_samples": self.step * self.samples_per_step,
            "epoch": self.step // self.sampler.steps_per_epoch,
            "metrics": {f"val_{k}": v for k, v in self.last_val_metrics.items()},
        }
        self.model.save_checkpoint(str(self.context.checkpoints.path_for(self.step)), extra)
        if self.context.is_global_zero:
            self.context.checkpoints.prune()

    def _maybe_resume(self) -> None:
        """Restore the newest valid checkpoint (model, optimizer, scheduler, RNG, step, :meth:`_restore`) when
        ``resume`` and there is one, and make ``<log_dir>/csv/metrics.csv`` continue from it.

        A damaged checkpoint (missing or unparseable ``meta.json``, missing or truncated ``state.pt``: see
        :func:`~nemo_aligner.utils.checkpoint.checkpoint_problem`) newer than the one resumed from is named in a
        warning and left on disk; its step is trained (and saved) again. Rows that a killed run logged after the
        resumed step are dropped from the CSV log (all of them for a fresh run), so each step appears once.

        Raises:
            DamagedCheckpointError: checkpoints exist but none is valid (restarting from step 0 would silently
                overwrite them), or the chosen checkpoint fails to load; the message names the path.
        """
        if self.context.resume:
            valid = self.context.checkpoints.checkpoints()
            latest = valid[-1][0] if valid else None
            latest_step = int(valid[-1][1]["step"]) if valid else -1
            damaged = [(path, problem) for path, problem in self.context.checkpoints.damaged()
                       if step_of_name(path) > latest_step or step_of_name(path) < 0]
            if damaged and latest is None:
                listing = "; ".join(f"{path}: {problem}" for path, problem in damaged)
                raise DamagedCheckpointError(
                    f"cannot resume: no valid checkpoint in {self.context.checkpoints.directory} ({listing}). Move the "
                    "damaged directories away to start over, or restore them from a backup"
                )
            if self.context.is_global_zero:
                for path, problem in damaged:
                    self.log.warning(f"warning: checkpoint {path} is damaged ({problem}); resuming from {latest} "
                                     "instead")
        else:
            latest = None
        if latest is None:
            if self.context.is_global_zero:
                trim_csv_log(self.context.log_dir, -1)
            return
        try:
            extra = self.model.load_checkpoint(str(latest))
        except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
            raise DamagedCheckpointError(f"cannot load checkpoint {latest / 'state.pt'}: {err}") from err
        self.step = int(extra["step"])
        self._restore(extra)
        self.last_val_metrics = {k[4:]: v for k, v in extra.get("metrics", {}).items() if k.startswith("val_")}
        if self.context.is_global_zero:
            dropped = trim_csv_log(self.context.log_dir, self.step)
            note = f"; dropped {dropped} CSV log rows logged after it" if dropped else ""
            self.log.info(f"resumed from {latest} at {self.name} step {self.step} "
                          f"(consumed_samples={extra.get('consumed_samples')}){note}")

    @contextlib.contextmanager
    def _stop_on_non_finite(self):
        """Around one training step: a :class:`~nemo_aligner.utils.checkpoint.NonFiniteError` from the model (the
        optimizer step was skipped, so the weights are those of the last finite step) is re-raised naming this
        loop's step and the last checkpoint, which is kept."""
        try:
            yield
        except NonFiniteError as err:
            latest = self.context.checkpoints.latest()
            kept = f"the last checkpoint, {latest}, is kept" if latest is not None else "no checkpoint was written"
            raise NonFiniteError(f"training stopped at {self.name} step {self.step + 1}/{self.max_steps}: {err}; "
                                 f"{kept}") from err

    @contextlib.contextmanager
    def _stop_on_disk_error(self, what: str, path: Path):
        """Around writing ``what`` (a checkpoint, the HF export) to ``path``: a write that fails because the disk is
        full or read-only (:func:`~nemo_aligner.utils.fs.disk_problem`) is re-raised as one
        :class:`~nemo_aligner.errors.DiskError` line naming the path, what to do and the last good checkpoint (a
        failed save never replaces it: checkpoints are written aside and renamed into place when complete)."""
        try:
            yield
        except UserError:
            raise
        except Exception as err:
            reason = disk_problem(err, path.parent)
            if reason is None:
                raise
            latest = self.context.checkpoints.latest()
            kept = (f"the last good checkpoint, {latest}, is kept: rerun the same command to resume from it"
                    if latest is not None else "no checkpoint was written")
            raise DiskError(f"cannot write {what} {path}: {reason}. Free space on that disk or make {path.parent} "
                            f"writable, or point exp_manager.explicit_log_dir at another disk; {kept}") from err

    def _run_validation(self) -> dict[str, float]:
        """:meth:`validate`, logged under ``val/`` and summarised in one line (rank 0); returns the metrics."""
        metrics = self.validate()
        if metrics:
            self.context.log_metrics({f"val/{k}": v for k, v in metrics.items()}, self.step)
            if self.context.is_global_zero:
                summary = format_metrics(metrics, self.val_summary_keys)
                self.log.info(f"validation step {self.step}/{self.max_steps}: {summary}")
        return metrics

    def _should(self, every: int) -> bool:
        """Whether the step just finished is a multiple of ``every`` (> 0) or the last one."""
        return (every > 0 and self.step % every == 0) or self.step == self.max_steps

    def _validate_and_save(self, val_every: int, save_every: int) -> None:
        """After a step: validate every ``val_every`` steps and checkpoint every ``save_every`` steps (each also
        after the last step; 0 = only then).

        Raises:
            DiskError: the checkpoint cannot be written (disk full or read-only); the previous one is kept.
        """
        if self._should(val_every):
            self.last_val_metrics = self._run_validation()
        if self._should(save_every):
            with self._stop_on_disk_error("checkpoint", self.context.checkpoints.path_for(self.step)):
                self._save()

    def _export(self) -> None:
        """Write ``<log_dir>/hf_export`` when ``export_hf``.

        Raises:
            DiskError: the export cannot be written (disk full or read-only); an older export is untouched.
        """
        if not self.context.export_hf:
            return
        with self._stop_on_disk_error("the Hugging Face export", self.context.log_dir / "hf_export"):
            self.model.export_hf(str(self.context.log_dir / "hf_export"))
        if self.context.is_global_zero:
            role = f" of {self.export_role}" if self.export_role else ""
            self.log.info(f"Hugging Face export{role} written to {self.context.log_dir / 'hf_export'}")


class BaseTrainer(TrainingLoop):
    """Offline training loop: batches -> loss -> optimizer step, with validation, checkpoints, resume, export.

    Args:
        model: the model being trained.
        train_dataset, val_dataset: indexable datasets of tokenised examples (dicts).
        collate_fn: ``list[dict] -> batch``; each example gets an ``index`` key (its dataset index). The batch
            must expose ``num_tokens`` (int, the throughput unit).
        cfg: loop configuration.
        context: the run's directory (``hf_export/`` goes there), checkpoints, metrics sink and flags.
    """

    #: Progress-bar label and the metrics shown in the one-line validation summary.
    name = "train"
    summary_keys: list[str] = ["loss"]

    def __init__(self, model: AlignableModel, train_dataset: Sequence[dict], val_dataset: Sequence[dict] | None,
                 collate_fn: Callable[[list[dict]], Any], cfg: TrainerConfig, context: RunContext):
        super().__init__(model, context)
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.collate_fn = collate_fn
        self.cfg = cfg
        self.sampler = GlobalBatchSampler(
            len(train_dataset),
            cfg.global_batch_size,
            cfg.micro_batch_size,
            rank=model.data_parallel_rank,
            world_size=model.data_parallel_size,
            seed=cfg.seed,
        )
        self.max_steps = compute_max_steps(len(train_dataset), cfg)

    # ---- what a subclass provides -----------------------------------------------------------------------------
    def loss_and_metrics(self, batch: Any, training: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss (mean over the micro-batch) and scalar metrics for one micro-batch.

        Called inside the model's gradient-accumulation context when ``training``, under ``no_grad`` otherwise.
        """
        raise NotImplementedError

    # ---- batches ----------------------------------------------------------------------------------------------
    def collate(self, dataset: Sequence[dict], indices: list[int]) -> Any:
        """Collate dataset rows ``indices`` (each tagged with its ``index``) into a batch."""
        return self.collate_fn([dict(dataset[i], index=i) for i in indices])

    # ---- steps ------------------------------------------------------------------------------------------------
    def train_step(self, micro_batch_indices: list[list[int]]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns metrics averaged over the global batch."""
        start = time.perf_counter()
        num_tokens = 0

        def loss_fn(indices: list[int]):
            nonlocal num_tokens
            batch = self.collate(self.train_dataset, indices)
            num_tokens += batch.num_tokens
            return self.loss_and_metrics(batch, training=True)

        n = len(micro_batch_indices)
        sums, step_info = optimizer_step(self.model, micro_batch_indices, loss_fn, [1.0] * n, n)
        metrics = self.model.all_reduce_mean(sums)
        elapsed = time.perf_counter() - start
        metrics.update(step_info)
        metrics["tokens_per_sec"] = num_tokens * self.model.data_parallel_size / max(elapsed, 1e-9)
        metrics["step_time"] = elapsed
        return metrics

    def validate(self) -> dict[str, float]:
        """Average the metrics over ``limit_val_batches`` validation batches (weighted by examples, all ranks)."""
        if not self.val_dataset:
            return {}
        sums: dict[str, float] = {}
        count = 0
        with self.model.inference():
            for indices in sequential_batches(
                len(self.val_dataset),
                self.cfg.micro_batch_size,
                self.model.data_parallel_rank,
                self.model.data_parallel_size,
                self.cfg.limit_val_batches,
            ):
                if not indices:
                    continue
                batch = self.collate(self.val_dataset, indices)
                _, metrics = self.loss_and_metrics(batch, training=False)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
                count += len(indices)
        reduced = self.model.all_reduce_mean({**sums, "__count": float(count)})
        total = reduced.pop("__count")
        return {k: v / total for k, v in reduced.items()} if total > 0 else {}

    # ---- loop -------------------------------------------------------------------------------------------------
    @property
    def samples_per_step(self) -> int:
        """Examples per optimizer step over all ranks (``global_batch_size``)."""
        return self.cfg.global_batch_size

    @property
    def val_summary_keys(self) -> list[str]:
        """The validation summary shows :attr:`summary_keys`."""
        return self.summary_keys

    def fit(self) -> list[dict[str, float]]:
        """Train to ``max_steps``; returns the per-step training metrics of this call (also logged)."""
        from tqdm.auto import tqdm

        self._maybe_resume()
        progress = tqdm(
            total=self.max_steps, initial=self.step, desc=self.name, disable=not self.context.is_global_zero,
            dynamic_ncols=True,
        )
        val_every, save_every = int(self.cfg.val_check_interval), int(self.cfg.save_interval)
        while self.step < self.max_steps:
            with self._stop_on_non_finite():
                metrics = self.train_step(self.sampler.micro_batches(self.step))
            self.step += 1
            metrics["epoch"] = (self.step - 1) // self.sampler.steps_per_epoch
            metrics["consumed_samples"] = self.step * self.cfg.global_batch_size
            self.history.append(metrics)
            self.context.log_metrics({f"train/{k}": v for k, v in metrics.items()}, self.step)
            progress.update(1)
            shown = {k: f"{metrics[k]:.4g}" for k in self.summary_keys[:2] if k in metrics}
            progress.set_postfix(**shown, tok_s=f"{metrics['tokens_per_sec']:.0f}")
            self._validate_and_save(val_every, save_every)
        progress.close()
        self._export()
        return self.history
