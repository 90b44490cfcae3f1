"""Token selection: repetition penalty, temperature, top-k, top-p and counter-based (batch-invariant) sampling.

Sampling uses the Gumbel-max trick (Gumbel 1954; Maddison, Tarlow & Minka 2014, "A* Sampling"): the token
``argmax_i(logit_i + G_i)`` with ``G_i = -log(-log U_i)`` and ``U_i ~ Uniform(0, 1)`` is distributed as
``softmax(logits)``. The uniforms are not drawn from a stateful RNG but computed by a hash (SplitMix64, Steele,
Lea & Flood 2014, "Fast Splittable Pseudorandom Number Generators") of ``(row seed, step, token id)``. So a
response depends only on its own seed and its own logits: the same prompt with the same seed gives the same
response whatever else is in the batch, whichever rows were dropped, and on however many data-parallel ranks.
"""

from __future__ import annotations

import hashlib

import torch

from nemo_aligner.generation.params import SamplingParams


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_STEP = _signed(0xD1B54A32D192ED03)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bits."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser of int64 tensors (any shape, wrapping arithmetic), Steele et al. 2014.

    Returns an int64 tensor of the same shape whose bits look independent and uniform for distinct inputs.
    """
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def response_seed(seed: int, prompt_index: int, response_index: int) -> int:
    """The sampling seed of response ``response_index`` of the prompt with global index ``prompt_index`` (its index
    in the dataset, not in a rank's or a micro-batch's share): the first 63 bits of
    ``blake2b("{seed}:{prompt_index}:{response_index}")``. Given as the ``seeds=`` of
    :func:`nemo_aligner.generation.generate`, it makes each response independent of how the prompts are split over
    data-parallel ranks, micro-batches and interrupted runs, and different for every prompt and response."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{response_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_keys(row_keys: torch.Tensor, step: int) -> torch.Tensor:
    """``[b]`` int64 per-row keys for decoding step ``step`` (0-based), from ``[b]`` int64 row keys."""
    return splitmix64(row_keys + _signed(((step + 1) * _STEP) & ((1 << 64) - 1)))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Uniforms strictly inside (0, 1) from int64 random bits (any shape): float64, same shape.

    ``U = (k + 0.5) / 2**52`` with ``k`` the top 52 bits. Every step is exact in float64 (``k + 0.5 < 2**52`` needs
    53 significant bits, and the scaling is by a power of two), so ``U`` is the midpoint of one of ``2**52`` equal
    cells, ``2**-53 <= U <= 1 - 2**-53``, and ``-log(-log U)`` is finite, between -3.60 and 36.74. (With 24 bits in
    float32 the largest value ``(2**24 - 0.5) / 2**24`` rounds to 1.0, which gives ``G = +inf``.)
    """
    return (_shift_right(bits, 12).to(torch.float64) + 0.5) * (1.0 / (1 << 52))


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``[b, k]`` float32 for ``[b]`` int64 step keys and ``[b, k]`` (or ``[1, k]``) token ids.

    ``U = uniform_from_bits(splitmix64(key + token * golden))`` (strictly inside (0, 1), see
    :func:`uniform_from_bits`) and ``G = -log(-log U)``, computed in float64 and always finite. The value for a
    given ``(key, token)`` does not depend on which other tokens are asked for.
    """
    uniform = uniform_from_bits(splitmix64(keys[:, None] + token_ids * _GOLDEN))
    return (-torch.log(-torch.log(uniform))).to(torch.float32)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019, section 4.1) as implemented by most libraries (HF, vLLM):
    the logit of each token already seen is divided by ``penalty`` if positive, multiplied by it if negative.

    Args:
        logits: ``[b, V]`` float. seen: ``[b, V]`` bool, True for tokens of the prompt or the response so far.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def choose_tokens(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor | None) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: ``[b, V]`` float32 next-token logits (after the repetition penalty and the EOS ban).
        params: greedy, or temperature / top-k (Fan et al. 2018) / top-p (Holtzman et al. 2020) sampling; top-k is
            applied before top-p, both after the temperature, as in Hugging Face transformers.
        keys: ``[b]`` int64 step keys (:func:`step_keys`); unused when greedy.

    Returns:
        ``[b]`` int64 token ids; never a token whose logit is ``-inf`` (masked by top-k / top-p or banned), unless
        the whole row is ``-inf``.
    """
    if params.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature if params.temperature != 1.0 else logits
    vocab = logits.shape[-1]
    index = None
    if 0 < params.top_k < vocab:
        logits, index = logits.topk(params.top_k, dim=-1)  # sorted, most likely first
    elif params.top_p < 1.0:
        logits, index = logits.sort(dim=-1, descending=True)
    if params.top_p < 1.0:
        probs = logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        logits = logits.masked_fill(mass_before >= params.top_p, float("-inf"))  # the top token always survives
    token_ids = index if index is not None else torch.arange(vocab, device=logits.device)[None, :]
    # A masked token (-inf: top-k/top-p, the EOS ban) stays -inf whatever its noise, never -inf + inf = NaN,
    # which argmax would return.
    scores = torch.where(torch.isneginf(logits), float("-inf"), logits + gumbel_noise(keys, token_ids))
    choice = scores.argmax(dim=-1)
    return choice if index is None else index.gather(1, choice[:, None]).squeeze(1)
