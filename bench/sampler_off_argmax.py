"""How often the Gumbel-max sampler leaves the arg-max of a nearly deterministic distribution.

Vocabulary ``V`` (default SmolLM2's 49152): token 0 has logit 0, every other token logit ``-gap`` (default 30), so
the exact probability of any other token is ``(V - 1) e^-gap / (1 + (V - 1) e^-gap)`` (4.6e-9 by default). Each
draw is one row of :func:`nemo_aligner.generation.sampling.choose_tokens` with its own key; the script prints the
fraction of draws that picked another token (with a 95 % Wilson interval), without and with top-p.

    python bench/sampler_off_argmax.py --draws 20000
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from nemo_aligner.generation import SamplingParams
from nemo_aligner.generation.sampling import choose_tokens, splitmix64


def _interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion ``k / n`` (Wilson 1927)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--gap", type=float, default=30.0, help="logit gap between token 0 and every other token")
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--chunk", type=int, default=256, help="rows per choose_tokens call")
    args = parser.parse_args()

    logits = torch.full((1, args.vocab), -args.gap)
    logits[0, 0] = 0.0
    tail = (args.vocab - 1) * math.exp(-args.gap)
    print(f"vocab {args.vocab}, gap {args.gap}: exact off-argmax probability {tail / (1 + tail):.3g}")
    for params in (SamplingParams(), SamplingParams(top_p=0.9)):
        start, off = time.perf_counter(), 0
        for first in range(0, args.draws, args.chunk):
            rows = min(args.chunk, args.draws - first)
            keys = splitmix64(torch.arange(first, first + rows, dtype=torch.long) + 977)
            off += int((choose_tokens(logits.expand(rows, -1), params, keys) != 0).sum())
        low, high = _interval(off, args.draws)
        print(f"top_p={params.top_p}: {off}/{args.draws} off-argmax draws = {off / args.draws:.4%} "
              f"(95% CI {low:.4%} .. {high:.4%}), {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
