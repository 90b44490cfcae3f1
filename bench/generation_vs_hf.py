"""Generation throughput: nemo_aligner.generation.generate vs transformers ``model.generate``.

Same model, same HH-RLHF prompts (tokenised by nemo_aligner.data.prompts), same batch size and max new tokens;
greedy and sampling. Tokens/s counts real new tokens (up to and including EOS, no padding) over wall time,
one warm-up batch excluded. For greedy it also reports how many responses are identical between the two.

    flock /tmp/smollm2.lock python bench/generation_vs_hf.py --batch-size 8 --max-new-tokens 64 --num-batches 2
"""

from __future__ import annotations

import argparse
import time

import torch

from nemo_aligner.data.prompts import load_prompts, tokenize_prompt
from nemo_aligner.generation import LengthParams, SamplingParams, generate
from nemo_aligner.models.hf_causal_lm import load_tokenizer
from nemo_aligner.models.pretrained import resolve_pretrained


def _hf_generate(lm, tokenizer, batch, params: SamplingParams, max_new: int, eos: list[int], seed: int):
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = next(lm.parameters()).device
    torch.manual_seed(seed)
    kwargs = dict(do_sample=False) if params.use_greedy else dict(
        do_sample=True, temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
    out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                      eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **kwargs)
    responses = []
    for row in out[:, width:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        responses.append(row[:cut])
    return responses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default="../shared/data/hh-rlhf/validation.jsonl.gz")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=2, help="timed batches (plus one warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    source = resolve_pretrained(args.model)
    tokenizer = load_tokenizer(source)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    eos = sorted({tokenizer.eos_token_id, *([lm.generation_config.eos_token_id] if isinstance(lm.generation_config.eos_token_id, int) else lm.generation_config.eos_token_id or [])})
    needed = args.batch_size * (args.num_batches + 1)
    prompts = [tokenize_prompt(p.prompt, tokenizer)[-args.max_prompt_length:] for p in load_prompts(args.prompts, needed)]
    batches = [prompts[k: k + args.batch_size] for k in range(0, needed, args.batch_size)]
    print(f"model {source} on {args.device} ({args.dtype}); batch {args.batch_size}, {args.num_batches} timed batches, "
          f"max {args.max_new_tokens} new tokens, prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))}")

    modes = {"greedy": SamplingParams(use_greedy=True), "sampling": SamplingParams(temperature=0.8, top_k=50, top_p=0.9)}
    lengths = LengthParams(max_length=args.max_new_tokens)
    for name, params in modes.items():
        rates, outputs = {}, {}
        for impl in ("ours", "hf"):
            tokens, seconds, outs = 0, 0.0, []
            for b, batch in enumerate(batches):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.no_grad():
                    if impl == "ours":
                        res = generate(lm, batch, params, lengths, eos, tokenizer.pad_token_id,
                                       generator=torch.Generator().manual_seed(b)).response_ids
                    else:
                        res = _hf_generate(lm, tokenizer, batch, params, args.max_new_tokens, eos, b)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if b == 0:
                    continue  # warm-up
                seconds += time.perf_counter() - start
                tokens += sum(len(r) for r in res)
                outs.extend(res)
            rates[impl], outputs[impl] = tokens / seconds, outs
            print(f"{name:8s} {impl:4s}: {tokens:6d} tokens in {seconds:7.2f} s = {rates[impl]:8.1f} tokens/s")
        line = f"{name:8s} ratio ours/hf = {rates['ours'] / rates['hf']:.2f}"
        if name == "greedy":
            same = sum(a == b for a, b in zip(outputs["ours"], outputs["hf"]))
            line += f"; identical greedy responses {same}/{len(outputs['ours'])}"
        print(line)


if __name__ == "__main__":
    main()
