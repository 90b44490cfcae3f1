"""Generate responses to a prompt file, data-parallel and resumable; optionally score them with a reward model.

    python examples/nlp/gpt/generate.py \
        pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
        data.prompt_file=../shared/data/hh-rlhf/validation.jsonl.gz data.max_prompts=64 \
        generation.num_responses_per_prompt=4 generation.sampling_params.top_p=0.9 \
        generation.length_params.max_length=128 generation.output_file=results/gen/responses.jsonl

Writes one JSON line per prompt, in input order: ``{"prompt": ..., "responses": [str, ...]}`` plus
``"rewards": [float, ...]`` when a reward model is configured (``rm.restore_from_path`` or ``rm.remote.{ip,port}``).

Configuration: conf/generation.yaml. Several ranks (``trainer.devices=2 trainer.strategy=ddp``, or torchrun/SLURM)
split the prompts in fixed chunks of ``model.micro_batch_size // num_responses_per_prompt`` prompts, chunk ``c``
going to rank ``c % world_size``; each rank appends finished prompts to ``<output_file>.parts/part-<rank>.jsonl``
(flushed line by line) and rank 0 merges the parts into ``output_file`` atomically, then deletes them. A rerun after
an interruption skips the prompts already in the parts (a torn last line is dropped) and regenerates the rest; as
response ``j`` of prompt ``i`` samples with a seed derived from ``(model.seed, i, j)`` and chunks do not depend on
the number of ranks, the result does not depend on interruptions or on the number of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.data.prompts import load_prompts, tokenize_prompt_example
from nemo_aligner.errors import OutputExistsError, UnsupportedError
from nemo_aligner.generation import LengthParams, SamplingParams, response_seed
from nemo_aligner.models.hf_causal_lm import HFCausalLM
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.recipes.common import run_or_exit, use_rollout_engine
from nemo_aligner.utils.config import CONF_DIR, ConfigValueError, as_list, check_keys, load_schema
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import build_fabric, normalize_precision


META_FILE = "meta.json"


def read_part(path: Path) -> tuple[dict[int, dict], int]:
    """The complete records of a part file by prompt index, and the byte length of its intact prefix.

    A last line without a newline or that is not valid JSON (a write cut short by an interruption) is not part of
    the intact prefix; neither is anything after it.
    """
    records: dict[int, dict] = {}
    data = path.read_bytes() if path.is_file() else b""
    good = 0
    while True:
        end = data.find(b"\n", good)
        if end < 0:
            break
        try:
            record = json.loads(data[good:end])
            index = int(record["index"])
        except (ValueError, KeyError, TypeError):
            break
        records.setdefault(index, record)
        good = end + 1
    return records, good


def _part_files(parts_dir: Path) -> list[Path]:
    return sorted(parts_dir.glob("part-*.jsonl"))


def _settings(cfg: DictConfig, source: str, num_prompts: int) -> dict:
    """What determines the content of the output; a resumed run must use the same."""
    return {
        "model": str(source),
        "prompt_file": [str(p) for p in as_list(cfg.data.prompt_file)],
        "num_prompts": num_prompts,
        "max_prompt_length": cfg.data.max_prompt_length,
        "seed": int(cfg.model.seed),
        "micro_batch_size": int(cfg.model.micro_batch_size),
        "num_responses_per_prompt": int(cfg.generation.num_responses_per_prompt),
        "sampling_params": OmegaConf.to_container(cfg.generation.sampling_params),
        "length_params": OmegaConf.to_container(cfg.generation.length_params),
        "precision": str(cfg.trainer.precision),
        "rm": OmegaConf.to_container(cfg.rm),
    }


def _check_or_write_meta(parts_dir: Path, settings: dict, output: Path) -> None:
    from nemo_aligner.utils.fs import atomic_write_text

    meta = parts_dir / META_FILE
    if meta.is_file():
        old = json.loads(meta.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise OutputExistsError(
                f"{parts_dir} holds an interrupted generation with different settings ({', '.join(changed)}); "
                f"rerun with the same settings to resume, or delete {parts_dir} (or pick another "
                f"generation.output_file than {output}) to start over"
            )
    else:
        atomic_write_text(meta, json.dumps(settings, indent=2, default=str))


def build_scorer(cfg: DictConfig, device) -> Any:
    """``score(prompts, responses) -> list[float]`` from ``rm.restore_from_path`` (in-process
    :class:`~nemo_aligner.models.reward_model.RewardScorer`) or ``rm.remote.{ip,port}``
    (:class:`~nemo_aligner.servers.client.RewardModelClient`); None when neither is set.

    Raises:
        ValueError: both are set, or only one of ``ip``/``port``.
    """
    rm = cfg.rm
    remote = rm.remote
    if rm.restore_from_path and (remote.ip or remote.port):
        raise ConfigValueError("set either rm.restore_from_path or rm.remote.{ip,port}, not both")
    if rm.restore_from_path:
        from nemo_aligner.models.reward_model import RewardScorer

        scorer = RewardScorer.from_pretrained(str(rm.restore_from_path), device=device,
                                              micro_batch_size=int(rm.micro_batch_size))
        return scorer.score_texts
    if remote.ip or remote.port:
        if not (remote.ip and remote.port):
            raise ConfigValueError("rm.remote needs both ip and port")
        from nemo_aligner.servers.client import RewardModelClient

        client = RewardModelClient(f"http://{remote.ip}:{int(remote.port)}", api_token=remote.api_token)
        return client.score
    return None


def merge_parts(parts_dir: Path, output: Path, num_prompts: int) -> None:
    """Write the records of all part files to ``output`` in prompt order (without ``index``), atomically.

    Raises:
        RuntimeError: a prompt index in ``[0, num_prompts)`` is missing from the parts.
    """
    records: dict[int, dict] = {}
    for part in _part_files(parts_dir):
        for index, record in read_part(part)[0].items():
            records.setdefault(index, record)
    missing = [i for i in range(num_prompts) if i not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} prompts missing from {parts_dir} (first: {missing[:5]})")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for i in range(num_prompts):
                record = {k: v for k, v in records[i].items() if k != "index"}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(cfg: DictConfig) -> dict:
    """Generate (and score) responses for ``cfg``. Returns rank 0's ``{"output_file", "num_prompts", "generated",
    "new_tokens", "seconds"}`` (``generated`` counts the prompts this rank generated in this run).

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing prompt file; DataFormatError: a bad prompt
        line; FileExistsError: the output exists already, or the parts of an interrupted run with other settings;
        ValueError: bad sampling/length parameters; NotImplementedError: ``trainer.strategy=fsdp``.
    """
    check_keys(cfg, load_schema("generation"), source="generation config")
    log = get_logger()
    gen = cfg.generation
    sampling = SamplingParams.from_cfg(gen.sampling_params)
    lengths = LengthParams.from_cfg(gen.length_params)
    num_responses = int(gen.num_responses_per_prompt)
    batch_rows = int(cfg.model.micro_batch_size)
    if num_responses < 1 or batch_rows < 1:
        raise ConfigValueError("generation.num_responses_per_prompt and model.micro_batch_size must be >= 1")
    if str(cfg.trainer.get("strategy", "auto")) == "fsdp":
        raise UnsupportedError("generation does not support trainer.strategy=fsdp; use ddp")
    output = Path(str(gen.output_file))
    parts_dir = output.parent / f"{output.name}.parts"
    if output.exists() and not parts_dir.exists():
        raise OutputExistsError(f"{output} already exists; delete it or set generation.output_file to another path")
    max_prompts = int(cfg.data.max_prompts)
    prompts = load_prompts(as_list(cfg.data.prompt_file), None if max_prompts < 0 else max_prompts)

    fabric = build_fabric(cfg.trainer, seed=int(cfg.model.seed))
    rank, world = fabric.global_rank, fabric.world_size
    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path)) if fabric.is_global_zero else None
    fabric.barrier()
    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    model_cfg = OmegaConf.create({
        "attn_implementation": cfg.model.attn_implementation,
        "optim": {"name": "adamw", "lr": 0.0},
        "peft": {"peft_scheme": "none"},
    })
    policy = HFCausalLM(fabric, model_cfg, source, max_steps=1, gradient_clip_val=0.0, need_reference=False,
                        precision=normalize_precision(cfg.trainer.precision))
    policy.freeze()
    use_rollout_engine(policy, cfg.trainer.get("generation", {}).get("vllm"), "trainer.generation.vllm", log)
    tokenizer = policy.tokenizer
    scorer = build_scorer(cfg, fabric.device)

    # ---- resume state: every rank reads every part; then each rank trims its own torn tail --------------------------
    if fabric.is_global_zero:
        parts_dir.mkdir(parents=True, exist_ok=True)
        _check_or_write_meta(parts_dir, _settings(cfg, source, len(prompts)), output)
    fabric.barrier()
    done: set[int] = set()
    for part in _part_files(parts_dir):
        done.update(read_part(part)[0])
    own = parts_dir / f"part-{rank:05d}.jsonl"
    fabric.barrier()
    if own.is_file():
        with open(own, "r+b") as f:
            f.truncate(read_part(own)[1])

    per_chunk = max(1, batch_rows // num_responses)
    chunks = [list(range(s, min(s + per_chunk, len(prompts)))) for s in range(0, len(prompts), per_chunk)]
    mine = [c for k, c in enumerate(chunks) if k % world == rank and not all(i in done for i in c)]
    if fabric.is_global_zero:
        todo = len(prompts) - len(done)
        log.info(f"{len(prompts)} prompts x {num_responses} responses from {source} on {world} rank(s); "
                 f"{len(done)} already done in {parts_dir}, {todo} to generate")

    start, new_tokens, generated, truncated = time.perf_counter(), 0, 0, 0
    with open(own, "a", encoding="utf-8") as sink:
        for chunk in mine:
            rows, seeds, owners = [], [], []
            for i in chunk:
                ids, cut = tokenize_prompt_example(prompts[i], tokenizer, cfg.data.max_prompt_length)
                truncated += cut
                for j in range(num_responses):
                    rows.append(ids)
                    seeds.append(response_seed(int(cfg.model.seed), i, j))
                    owners.append(i)
            responses: list[list[int]] = []
            for s in range(0, len(rows), batch_rows):  # a prompt's responses may need several batches
                out = policy.generate(rows[s : s + batch_rows], sampling, lengths, seeds=seeds[s : s + batch_rows])
                responses.extend(out.response_ids)
            new_tokens += sum(len(r) for r in responses)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            rewards = None
            if scorer is not None:
                rewards = scorer([prompts[i].prompt for i in owners], texts)
            for i in chunk:
                if i in done:
                    continue  # regenerated only to keep the batch identical; already written
                picks = [k for k, owner in enumerate(owners) if owner == i]
                record = {"index": i, "prompt": prompts[i].prompt, "responses": [texts[k] for k in picks]}
                if rewards is not None:
                    record["rewards"] = [float(rewards[k]) for k in picks]
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                generated += 1
            if fabric.is_global_zero:
                elapsed = time.perf_counter() - start
                log.info(f"rank 0: {generated} prompts, {new_tokens} tokens, {new_tokens / max(elapsed, 1e-9):.1f} tokens/s")
    seconds = time.perf_counter() - start
    if truncated:
        log.info(f"rank {rank}: {truncated} prompts longer than data.max_prompt_length={cfg.data.max_prompt_length} "
                 "kept their last tokens")
    fabric.barrier()
    if fabric.is_global_zero:
        merge_parts(parts_dir, output, len(prompts))
        shutil.rmtree(parts_dir, ignore_errors=True)
        log.info(f"wrote {len(prompts)} prompts to {output}")
    fabric.barrier()
    return {"output_file": str(output), "num_prompts": len(prompts), "generated": generated,
            "new_tokens": new_tokens, "seconds": seconds}


@hydra.main(config_path=str(CONF_DIR), config_name="generation", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)  # a user's mistake: one clear line, no traceback


if __name__ == "__main__":
    sys.exit(main())
