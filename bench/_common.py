"""What the training benchmarks against TRL (``dpo_vs_trl.py``, ``rm_vs_trl.py``, ``sft_vs_trl.py``) share: the pair
selection, the command-line options, running our recipe and the TRL trainer each in a child process, and the result
lines.

Imported as ``from _common import ...``: running ``python bench/<name>.py`` puts ``bench/`` first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "train.jsonl.gz"


def parse_args(description: str, steps: int, max_length: int, pack: bool = False,
               shared_prefix: bool = False, unit: str = "pairs",
               pack_help: str = "ours with model.data.pack_sequences=true") -> argparse.Namespace:
    """The benchmarks' common options (``--model --data --steps --batch-size --max-length --precision --verbose``,
    ``--pack`` (described by ``pack_help``) when ``pack``, ``--no-shared-prefix`` when ``shared_prefix``), with the
    given defaults; ``unit`` is what ``--batch-size`` counts."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF dir, .gguf, or alias")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=2, help=f"{unit} per optimizer step (one micro-batch)")
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    if pack:
        parser.add_argument("--pack", action="store_true", help=pack_help)
    if shared_prefix:
        parser.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                            help="ours with model.data.shared_prefix=false (one row per response, as TRL)")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args()


def select_pairs(data: Path, tokenizer_dir: str, count: int, max_length: int) -> tuple[list[dict], int]:
    """The first ``count`` HH-RLHF pairs that fit ``max_length``, as TRL text records, and their token total."""
    from transformers import AutoTokenizer

    from nemo_aligner.data.preference import parse_preference_record, tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs, tokens = [], 0
    with gzip.open(data, "rt") if str(data).endswith(".gz") else open(data) as f:
        for line_no, line in enumerate(f, 1):
            example = parse_preference_record(json.loads(line), data, line_no)
            prompt, chosen, rejected = tokenize_example(example, tokenizer)
            if len(prompt) + max(len(chosen), len(rejected)) > max_length:
                continue
            pairs.append({"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected})
            tokens += 2 * len(prompt) + len(chosen) + len(rejected)
            if len(pairs) == count:
                return pairs, tokens
    raise SystemExit(f"only {len(pairs)} pairs of {data} fit {max_length} tokens; need {count}")


def prepare_pairs(args: argparse.Namespace, work: Path) -> tuple[str, Path, list[dict], int]:
    """Resolve ``--model``, select ``steps * batch_size`` pairs and write them to ``work/pairs.jsonl``.

    Returns:
        ``(model_dir, data_file, pairs, tokens)``.
    """
    from nemo_aligner.models.pretrained import resolve_pretrained

    model_dir = resolve_pretrained(args.model)
    pairs, tokens = select_pairs(Path(args.data), model_dir, args.steps * args.batch_size, args.max_length)
    data_file = work / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return model_dir, data_file, pairs, tokens


def preference_data_overrides(args: argparse.Namespace, data_file: Path) -> list[str]:
    """The DPO / reward-model recipes' keys for training on ``data_file`` alone in micro-batches of ``--batch-size``
    of at most ``--max-length`` tokens."""
    return [
        f"model.data.data_prefix.train=[{data_file}]", "model.data.data_prefix.validation=null",
        f"model.global_batch_size={args.batch_size}", f"model.micro_batch_size={args.batch_size}",
        f"model.encoder_seq_length={args.max_length}",
    ]


def run_recipe(args: argparse.Namespace, script: str, algorithm: str, model_dir: str, data_file: Path, work: Path,
               extra_overrides: list[str], data_overrides: list[str] | None = None) -> float:
    """Run ``examples/nlp/gpt/<script>`` for ``--steps`` steps of ``--batch-size`` on ``data_file`` (no
    validation, no checkpoints, no export, no truncation) and return the seconds spent in training steps, read
    from the run's CSV log (``train/step_time``).

    ``data_overrides`` name the data file, batch size and length in the recipe's own keys; default
    :func:`preference_data_overrides` (DPO, reward models)."""
    log_dir = work / "nemo_aligner_run"
    if data_overrides is None:
        data_overrides = preference_data_overrides(args, data_file)
    cmd = [
        sys.executable, str(REPO / "examples" / "nlp" / "gpt" / script),
        f"pretrained_checkpoint.restore_from_path={model_dir}", *data_overrides,
        f"model.data.cache_dir={work / 'cache'}", f"exp_manager.explicit_log_dir={log_dir}",
        "exp_manager.export_hf=false", "exp_manager.resume_if_exists=false",
        f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else 32}",
        f"trainer.{algorithm}.max_steps={args.steps}", f"trainer.{algorithm}.val_check_interval=0",
        f"trainer.{algorithm}.save_interval=0", "model.data.truncation=drop",
        *extra_overrides,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    with open(log_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    times = [float(r["train/step_time"]) for r in rows if r.get("train/step_time")]
    if len(times) != args.steps:
        raise SystemExit(f"nemo_aligner logged {len(times)} steps, expected {args.steps}")
    return sum(times)


TRL_CHILD_HEAD = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

model_dir, data_file, out_dir, batch, max_length, precision = sys.argv[1:7]
records = [json.loads(line) for line in open(data_file)]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token

class Timer(TrainerCallback):
    def on_train_begin(self, *a, **k): self.start = time.perf_counter()
    def on_train_end(self, *a, **k): self.seconds = time.perf_counter() - self.start

timer = Timer()
common_args = dict(
    output_dir=out_dir, per_device_train_batch_size=int(batch), gradient_accumulation_steps=1, num_train_epochs=1,
    max_length=int(max_length), lr_scheduler_type="cosine", use_cpu=not torch.cuda.is_available(),
    gradient_checkpointing=False, bf16=precision == "bf16", report_to="none", save_strategy="no", eval_strategy="no",
    logging_steps=10**6, dataloader_num_workers=0, seed=1234,
)
"""

TRL_CHILD_TAIL = r"""
trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                  callbacks=[timer])
trainer.train()
print(json.dumps({"seconds": timer.seconds, "steps": trainer.state.global_step, "trl": __import__("trl").__version__}))
"""


def run_trl(args: argparse.Namespace, body: str, model_dir: str, data_file: Path, work: Path) -> tuple[float, str]:
    """Run a TRL trainer in a child process (``python -c``) and return ``(seconds in training, trl version)``.

    The child is :data:`TRL_CHILD_HEAD` + ``body`` + :data:`TRL_CHILD_TAIL`. The head parses the argv (model dir,
    data file, output dir, batch size, max length, precision) and defines ``records`` (the data file's JSON lines),
    ``tokenizer``, ``timer`` and ``common_args`` (the settings every benchmark shares); ``body`` must define
    ``model``, ``config`` (e.g. ``DPOConfig(**common_args, beta=0.1)``) and ``Trainer`` (the TRL trainer class);
    the tail trains and prints ``{"seconds", "steps", "trl"}``.

    Raises:
        SystemExit: the child failed, or ran another number of steps than ``--steps``.
    """
    child = TRL_CHILD_HEAD + body + TRL_CHILD_TAIL
    proc = subprocess.run(
        [sys.executable, "-c", child, model_dir, str(data_file), str(work / "trl_run"), str(args.batch_size),
         str(args.max_length), args.precision],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"TRL child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["steps"] != args.steps:
        raise SystemExit(f"TRL ran {result['steps']} steps, expected {args.steps}")
    return float(result["seconds"]), result["trl"]


def print_results(args: argparse.Namespace, pairs: list, tokens: int, ours: float, trl_seconds: float,
                  trl_version: str, settings: str = "", unit: str = "pairs") -> None:
    """Print the run's settings (plus ``settings``; ``unit`` names what ``pairs`` counts), both throughputs and their
    ratio."""
    device = "cuda" if __import__("torch").cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(f"model={args.model} {unit}={len(pairs)} steps={args.steps} batch={args.batch_size} max_length={args.max_length} "
          f"precision={args.precision}{settings} device={device} tokens={tokens}")
    print(f"nemo_aligner : {tokens / ours:10.1f} tokens/s  ({ours:.1f} s)")
    print(f"trl {trl_version:<8} : {tokens / trl_seconds:10.1f} tokens/s  ({trl_seconds:.1f} s)")
    print(f"ratio nemo_aligner / trl = {trl_seconds / ours:.2f}x")
