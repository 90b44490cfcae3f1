"""SFT training throughput: nemo_aligner vs TRL's SFTTrainer, same model, data, batch size and length.

    flock /tmp/smollm2.lock python bench/sft_vs_trl.py        # SmolLM2-135M-Instruct, HH-RLHF, CPU
    python bench/sft_vs_trl.py --model /path/to/hf_dir --steps 8 --batch-size 4 --max-length 1024 --pack

Data: the chosen side of the first ``steps * batch_size`` HH-RLHF records whose prompt + chosen response fits
``--max-length`` tokens, split as ``train_gpt_sft.py`` splits an HH transcript (at the last ``"\\n\\nAssistant:"``)
and written once as ``{"prompt", "completion"}`` records. Both trainers read that file: TRL as a prompt-completion
dataset (so ``completion_only_loss`` applies), ours as a prompt/response pair (``nemo_aligner/data/sft.py``). Both
put the loss on the response tokens only and neither truncates.

Both trainers run one epoch over these examples in micro-batches of ``--batch-size`` (one micro-batch per optimizer
step), full-parameter, fp32 (or ``--precision bf16``), no gradient checkpointing, each in its own child process of
this script, one after the other. Throughput is tokens per second of the training loop (every step, the first
included; model loading and tokenisation excluded): ours is the sum of ``train/step_time`` of the run's CSV log,
TRL's the time from ``on_train_begin`` to ``on_train_end``. An example counts ``len(prompt + response)`` of our
tokenisation (prompt with the tokenizer's special tokens, response, EOS) for both; TRL tokenises the same text
(its prompt, then prompt + completion + EOS).

``--pack``: ours with ``model.data.train_ds.packed_sequence=true`` (each micro-batch packed into rows of
``--max-length`` tokens, exact block-diagonal attention). TRL always runs unpacked (``packing=False``,
``padding_free=False``, padded to the longest sequence of each batch). TRL's ``packing=True`` is not the same
work: it packs the whole dataset into ``max_length`` rows before batching, so a step holds a different number of
examples and the run a different number of steps, and its padding-free layout keeps sequences apart only with
flash-attention kernels (not on CPU, not with ``sdpa``). ``--pack`` therefore measures what our packing buys
against TRL's default padded layout.

Requires ``pip install -e .[bench]`` (TRL).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from _common import parse_args, print_results, run_recipe, run_trl

TRL_BODY = r"""
from transformers import AutoModelForCausalLM
from trl import SFTConfig as Config, SFTTrainer as Trainer

model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
config = Config(**common_args, packing=False, padding_free=False, completion_only_loss=True, learning_rate=3e-5,
                weight_decay=0.01)
"""


def select_examples(data: Path, tokenizer_dir: str, count: int, max_length: int) -> tuple[list[dict], int]:
    """The first ``count`` HH-RLHF records whose chosen side (prompt + response, our SFT tokenisation) fits
    ``max_length`` tokens, as ``{"prompt", "completion"}`` texts, and their token total."""
    from transformers import AutoTokenizer

    from nemo_aligner.data.sft import parse_sft_record, tokenize_sft_example

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples, tokens = [], 0
    with gzip.open(data, "rt") if str(data).endswith(".gz") else open(data) as f:
        for line_no, line in enumerate(f, 1):
            record = json.loads(line)
            # the chosen side only (an HH transcript, or a TRL/NeMo pair's chosen response)
            example = parse_sft_record({k: v for k, v in record.items() if k != "rejected"}, data, line_no)
            if not (isinstance(example.prompt, str) and isinstance(example.response, str)):
                continue  # keep plain-text pairs, the format both trainers read the same way
            input_ids, _ = tokenize_sft_example(example, tokenizer)
            if len(input_ids) > max_length:
                continue
            examples.append({"prompt": example.prompt, "completion": example.response})
            tokens += len(input_ids)
            if len(examples) == count:
                return examples, tokens
    raise SystemExit(f"only {len(examples)} examples of {data} fit {max_length} tokens; need {count}")


def main() -> None:
    args = parse_args(__doc__, steps=6, max_length=256, pack=True, unit="examples",
                      pack_help="ours with model.data.train_ds.packed_sequence=true (TRL stays unpacked)")
    from nemo_aligner.models.pretrained import resolve_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = resolve_pretrained(args.model)
        examples, tokens = select_examples(Path(args.data), model_dir, args.steps * args.batch_size, args.max_length)
        data_file = work / "sft.jsonl"
        data_file.write_text("".join(json.dumps(e) + "\n" for e in examples))
        data_overrides = [
            f"model.data.train_ds.file_path={data_file}", "model.data.validation_ds.file_path=null",
            f"model.data.train_ds.global_batch_size={args.batch_size}",
            f"model.data.train_ds.micro_batch_size={args.batch_size}",
            f"model.data.train_ds.max_seq_length={args.max_length}",
            f"model.data.train_ds.packed_sequence={str(args.pack).lower()}",
        ]
        ours = run_recipe(args, "train_gpt_sft.py", "sft", model_dir, data_file, work, ["model.optim.lr=3e-5"],
                          data_overrides=data_overrides)
        trl_seconds, trl_version = run_trl(args, TRL_BODY, model_dir, data_file, work)
    print_results(args, examples, tokens, ours, trl_seconds, trl_version, f" pack={args.pack}", unit="examples")


if __name__ == "__main__":
    main()
