"""Reward-model training throughput: nemo_aligner vs TRL's RewardTrainer, same model, data, batch size and length.

    flock /tmp/smollm2.lock python bench/rm_vs_trl.py          # SmolLM2-135M-Instruct, HH-RLHF, CPU
    python bench/rm_vs_trl.py --model /path/to/hf_dir --steps 8 --batch-size 4 --max-length 1024

Both trainers run one epoch over the same ``steps * batch_size`` HH-RLHF pairs (only pairs whose longer side fits
``--max-length``, so neither truncates), full-parameter ``AutoModelForSequenceClassification(num_labels=1)``, fp32
(or ``--precision bf16``), no gradient checkpointing, each in its own child process of this script, one after the
other. Throughput is tokens per second of the training loop (every step, the first included; model loading and
tokenisation excluded), a pair counting ``len(prompt + chosen) + len(prompt + rejected)`` of our tokenisation for
both. Requires ``pip install -e .[bench]`` (TRL).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from dpo_vs_trl import DEFAULT_DATA, select_pairs  # noqa: E402  (same pair selection as the DPO benchmark)


def run_nemo_aligner(args, model_dir: str, data_file: Path, work: Path) -> float:
    """Seconds spent in training steps, read from the run's CSV log (train/step_time)."""
    log_dir = work / "nemo_aligner_run"
    cmd = [
        sys.executable, str(REPO / "examples/nlp/gpt/train_reward_model.py"),
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.data_prefix.train=[{data_file}]", "model.data.data_prefix.validation=null",
        f"model.data.cache_dir={work / 'cache'}", f"exp_manager.explicit_log_dir={log_dir}",
        "exp_manager.export_hf=false", "exp_manager.resume_if_exists=false",
        f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else 32}",
        f"trainer.rm.max_steps={args.steps}", "trainer.rm.val_check_interval=0", "trainer.rm.save_interval=0",
        f"model.global_batch_size={args.batch_size}", f"model.micro_batch_size={args.batch_size}",
        f"model.encoder_seq_length={args.max_length}", "model.data.truncation=drop", "model.optim.lr=1e-5",
        f"model.data.pack_sequences={str(args.pack).lower()}",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    rows = list(csv.DictReader(open(log_dir / "csv" / "metrics.csv")))
    times = [float(r["train/step_time"]) for r in rows if r.get("train/step_time")]
    if len(times) != args.steps:
        raise SystemExit(f"nemo_aligner logged {len(times)} steps, expected {args.steps}")
    return sum(times)


TRL_CHILD = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer

model_dir, data_file, out_dir, batch, max_length, precision = sys.argv[1:7]
pairs = [json.loads(line) for line in open(data_file)]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
model.config.pad_token_id = tokenizer.pad_token_id

class Timer(TrainerCallback):
    def on_train_begin(self, *a, **k): self.start = time.perf_counter()
    def on_train_end(self, *a, **k): self.seconds = time.perf_counter() - self.start

timer = Timer()
config = RewardConfig(
    output_dir=out_dir, per_device_train_batch_size=int(batch), gradient_accumulation_steps=1, num_train_epochs=1,
    max_length=int(max_length), learning_rate=1e-5, lr_scheduler_type="cosine", use_cpu=not torch.cuda.is_available(),
    gradient_checkpointing=False, bf16=precision == "bf16", report_to="none", save_strategy="no", eval_strategy="no",
    logging_steps=10**6, dataloader_num_workers=0, seed=1234,
)
trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer, callbacks=[timer])
trainer.train()
print(json.dumps({"seconds": timer.seconds, "steps": trainer.state.global_step, "trl": __import__("trl").__version__}))
"""


def run_trl(args, model_dir: str, data_file: Path, work: Path) -> tuple[float, str]:
    proc = subprocess.run(
        [sys.executable, "-c", TRL_CHILD, model_dir, str(data_file), str(work / "trl_run"), str(args.batch_size),
         str(args.max_length), args.precision],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"TRL child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["steps"] != args.steps:
        raise SystemExit(f"TRL ran {result['steps']} steps, expected {args.steps}")
    return float(result["seconds"]), result["trl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF dir, .gguf, or alias")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per optimizer step (one micro-batch)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--pack", action="store_true", help="ours with model.data.pack_sequences=true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    from nemo_aligner.models.pretrained import resolve_pretrained

    model_dir = resolve_pretrained(args.model)
    pairs, tokens = select_pairs(Path(args.data), model_dir, args.steps * args.batch_size, args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_file = work / "pairs.jsonl"
        data_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        ours = run_nemo_aligner(args, model_dir, data_file, work)
        trl_seconds, trl_version = run_trl(args, model_dir, data_file, work)
    device = "cuda" if __import__("torch").cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(f"model={args.model} pairs={len(pairs)} steps={args.steps} batch={args.batch_size} max_length={args.max_length} "
          f"precision={args.precision} pack={args.pack} device={device} tokens={tokens}")
    print(f"nemo_aligner : {tokens / ours:10.1f} tokens/s  ({ours:.1f} s)")
    print(f"trl {trl_version:<8} : {tokens / trl_seconds:10.1f} tokens/s  ({trl_seconds:.1f} s)")
    print(f"ratio nemo_aligner / trl = {trl_seconds / ours:.2f}x")


if __name__ == "__main__":
    main()
