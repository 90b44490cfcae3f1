"""Generation throughput: nemo_aligner.generation.generate (native) vs transformers ``model.generate``, and with
``--backend vllm`` also the vLLM rollout engine (:class:`nemo_aligner.generation.VLLMEngine`, the weights given to
it by the same refit the trainers use).

Same model, same HH-RLHF prompts (tokenised by nemo_aligner.data.prompts), same batch sizes and max new tokens;
greedy and sampling. Tokens/s counts real new tokens (up to and including EOS, no padding) over wall time,
one warm-up batch excluded (the vLLM engine's start-up is reported separately). For greedy it also reports how many
responses are identical to HF's. On CUDA, ``--bandwidth-gbs`` (the GPU's memory bandwidth, e.g. 3350 for an H100
SXM, 4800 for an H200) adds the memory-bandwidth bound of decoding: every decode step reads all the weights once, so
at most ``batch * bandwidth / weight_bytes`` tokens/s.

    flock /tmp/heavy.lock python bench/generation_vs_hf.py --backend vllm --batch-sizes 16 64 --max-new-tokens 64
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
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="one run per batch size")
    parser.add_argument("--backend", choices=["native", "vllm"], default="native",
                        help="vllm: also time the vLLM engine")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="GPU memory bandwidth (GB/s) for the bound")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs / torch.compile")
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
    engine = None
    if args.backend == "vllm":
        from nemo_aligner.generation import VLLMConfig, VLLMEngine

        engine = VLLMEngine(source, VLLMConfig(enable=True, enforce_eager=args.enforce_eager,
                                               max_num_seqs=max(args.batch_sizes)), dtype=args.dtype)
        refit = engine.refit(lm.state_dict().items())
        print(f"vLLM engine: start-up {engine.start_seconds:.1f} s, refit of the weights {refit:.2f} s")
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    impls = ("vllm", "ours", "hf") if engine is not None else ("ours", "hf")
    modes = {"greedy": SamplingParams(use_greedy=True), "sampling": SamplingParams(temperature=0.8, top_k=50, top_p=0.9)}
    lengths = LengthParams(max_length=args.max_new_tokens)
    for batch_size in args.batch_sizes:
        needed = batch_size * (args.num_batches + 1)
        prompts = [tokenize_prompt(p.prompt, tokenizer)[-args.max_prompt_length:] for p in load_prompts(args.prompts, needed)]
        batches = [prompts[k: k + batch_size] for k in range(0, needed, batch_size)]
        print(f"model {source} on {args.device} ({args.dtype}); batch {batch_size}, {args.num_batches} timed batches, "
              f"max {args.max_new_tokens} new tokens, prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))}")
        if args.bandwidth_gbs:
            print(f"memory-bandwidth bound at batch {batch_size}: {batch_size * args.bandwidth_gbs * 1e9 / weight_bytes:.0f} "
                  f"tokens/s ({weight_bytes / 1e6:.0f} MB of weights read per decode step)")
        for name, params in modes.items():
            rates, outputs = {}, {}
            for impl in impls:
                tokens, seconds, outs = 0, 0.0, []
                for b, batch in enumerate(batches):
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    with torch.no_grad():
                        if impl == "ours":
                            res = generate(lm, batch, params, lengths, eos, tokenizer.pad_token_id,
                                           generator=torch.Generator().manual_seed(b)).response_ids
                        elif impl == "vllm":
                            res = engine.generate(batch, params, lengths, eos,
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
                print(f"batch {batch_size:3d} {name:8s} {impl:4s}: {tokens:6d} tokens in {seconds:7.2f} s = "
                      f"{rates[impl]:8.1f} tokens/s")
            line = f"batch {batch_size:3d} {name:8s} ratio ours/hf = {rates['ours'] / rates['hf']:.2f}"
            if engine is not None:
                line += f", vllm/hf = {rates['vllm'] / rates['hf']:.2f}, vllm/ours = {rates['vllm'] / rates['ours']:.2f}"
            if name == "greedy":
                for impl in impls[:-1]:
                    same = sum(a == b for a, b in zip(outputs[impl], outputs["hf"]))
                    line += f"; identical greedy responses {impl}/hf {same}/{len(outputs['hf'])}"
            print(line)

if __name__ == "__main__":
    main()
