"""The Gumbel-max sampler: empirical distribution against the exact softmax (tokens far below the top included),
finite noise at the extreme bit patterns, and masked tokens never chosen, even under adversarial noise."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_aligner.generation import SamplingParams
from nemo_aligner.generation import sampling
from nemo_aligner.generation.sampling import choose_tokens, gumbel_noise, splitmix64

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(value: int) -> int:
    value &= _MASK
    return value - (1 << 64) if value >= (1 << 63) else value


def _undo_xorshift(y: int, shift: int) -> int:
    """The ``x`` with ``x ^ (x >> shift) == y`` (64-bit)."""
    x = y
    for _ in range(64 // shift + 1):
        x = y ^ (x >> shift)
    return x


def _splitmix64_inverse(target: int) -> int:
    """The int64 ``x`` with ``splitmix64(x) == target`` (the finaliser is a bijection of 64-bit words)."""
    z = _undo_xorshift(target & _MASK, 31)
    z = (z * pow(0x94D049BB133111EB, -1, 1 << 64)) & _MASK
    z = _undo_xorshift(z, 27)
    z = (z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & _MASK
    z = _undo_xorshift(z, 30)
    return _signed(z - _GOLDEN)


def _key_for(token: int, bits: int) -> int:
    """A step key whose hash for ``token`` is ``bits`` (so that token draws the chosen uniform)."""
    return _signed(_splitmix64_inverse(bits) - token * _GOLDEN)


# ---------------------------------------------------------------------------------------------------------------
# extreme uniforms
# ---------------------------------------------------------------------------------------------------------------
def test_extreme_bit_patterns_give_finite_noise():
    for bits in (_MASK, 0, 1 << 63, (1 << 63) - 1, _MASK ^ 0xFFFFFF):  # all ones = the largest uniform
        key = _key_for(7, bits)
        assert int(splitmix64(torch.tensor([_signed(key + 7 * _GOLDEN)]))[0]) == _signed(bits)  # the inverse works
        noise = gumbel_noise(torch.tensor([key]), torch.tensor([[7]]))
        assert torch.isfinite(noise).all(), (hex(bits), noise)
    u = sampling.uniform_from_bits(torch.tensor([_signed(_MASK), 0]))
    assert u.dtype == torch.float64 and u.tolist() == [1 - 2.0**-53, 2.0**-53]  # strictly inside (0, 1)
    top = gumbel_noise(torch.tensor([_key_for(7, _MASK)]), torch.tensor([[7]]))
    assert float(top) == pytest.approx(-math.log(-math.log1p(-(2.0**-53))), rel=1e-6)  # 36.74, the largest


def test_the_largest_uniforms_do_not_make_a_far_token_win():
    """Token 5, far below token 0, draws an extreme uniform. With 24 bits in float32 its noise was +inf for any
    pattern whose top 24 bits are ones, so it won (also under top-p, as -inf + inf = NaN). Now: top 24 bits ones
    (``U ~ 1 - 2**-24``, ``G ~ 16.6``) does not lift a 30-nat gap; all 64 bits ones (``G = 36.74``, the largest)
    does not lift a 45-nat gap (the noise spans at most 36.74 + 3.60 nats); a masked token never wins."""
    for gap, bits in ((30.0, 0xFFFFFF << 40), (30.0, (0xFFFFFF << 40) | 0x0123456789), (45.0, _MASK)):
        logits = torch.full((1, 64), -gap)
        logits[0, 0] = 0.0
        keys = torch.tensor([_key_for(5, bits)])
        for params in (SamplingParams(), SamplingParams(top_p=0.9), SamplingParams(top_k=8)):
            assert choose_tokens(logits, params, keys).tolist() == [0], (gap, hex(bits), params)
    logits = torch.full((1, 64), -30.0)
    logits[0, 0] = 0.0
    keys = torch.tensor([_key_for(5, _MASK)])  # the largest noise, 36.74, lifts a 30-nat gap (probability 2**-52)
    assert choose_tokens(logits, SamplingParams(), keys).tolist() == [5]
    assert choose_tokens(logits, SamplingParams(top_p=0.9), keys).tolist() == [0]  # unless top-p masked it


# ---------------------------------------------------------------------------------------------------------------
# masked tokens
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [SamplingParams(top_p=0.6), SamplingParams(top_k=3),
                                    SamplingParams(top_k=5, top_p=0.5, temperature=0.7)],
                         ids=["top_p", "top_k", "top_k+top_p"])
def test_masked_tokens_are_never_chosen_even_with_adversarial_noise(monkeypatch, params):
    torch.manual_seed(0)
    logits = torch.randn(64, 16) * 2
    logits[:, 3] = float("-inf")  # banned (the EOS ban of min_length): never chosen either
    scaled = logits / params.temperature
    allowed = torch.zeros_like(logits, dtype=torch.bool)
    for row in range(logits.shape[0]):
        order = scaled[row].argsort(descending=True)
        if params.top_k:
            order = order[: params.top_k]
        probs = scaled[row, order].softmax(-1)
        keep = order[(probs.cumsum(0) - probs) < params.top_p]
        allowed[row, keep] = True
    allowed &= torch.isfinite(logits)

    def adversarial(keys, token_ids):  # +inf on every masked token, nothing on the others
        masked = ~allowed.gather(1, token_ids.expand(logits.shape[0], -1))
        return torch.where(masked, float("inf"), 0.0)

    monkeypatch.setattr(sampling, "gumbel_noise", adversarial)
    keys = splitmix64(torch.arange(logits.shape[0]))
    chosen = choose_tokens(logits, params, keys)
    assert allowed.gather(1, chosen[:, None]).all(), chosen
    assert torch.equal(chosen, scaled.argmax(-1))  # with no noise on the allowed tokens: the most likely one

    monkeypatch.setattr(sampling, "gumbel_noise", lambda keys, token_ids: torch.full(token_ids.shape, float("nan")))
    assert allowed.gather(1, choose_tokens(logits, params, keys)[:, None]).all()  # NaN noise: masked still lose


# ---------------------------------------------------------------------------------------------------------------
# the empirical distribution
# ---------------------------------------------------------------------------------------------------------------
def test_empirical_distribution_matches_the_exact_softmax_far_below_the_top():
    """6000 keys on a 2048-token vocabulary: the top token, three tokens 1-3 nats below it, 1020 tokens 9 nats below
    and 1024 tokens 14 nats below (expected 3 picks in all). The counts of the six groups against the exact softmax:
    Pearson's chi-square (5 degrees of freedom; 20.5 is the 0.1 % point) and a binomial bound on each group; the
    picks inside the 9-nat band are spread evenly over its tokens (chi-square over 8 sub-bands, 7 dof, 0.1 %: 24.3)."""
    vocab, n = 2048, 6000
    logits = torch.empty(vocab, dtype=torch.float64)
    logits[0], logits[1], logits[2], logits[3] = 0.0, -1.0, -2.0, -3.0
    logits[4:1024], logits[1024:] = -9.0, -14.0
    groups = [range(0, 1), range(1, 2), range(2, 3), range(3, 4), range(4, 1024), range(1024, vocab)]
    exact = logits.softmax(-1)
    expected = torch.stack([exact[g.start : g.stop].sum() for g in groups]) * n

    chosen = torch.cat([
        choose_tokens(logits.float()[None].expand(rows, -1), SamplingParams(), splitmix64(torch.arange(s, s + rows)))
        for s, rows in ((s, min(1000, n - s)) for s in range(0, n, 1000))
    ])
    counts = torch.stack([((chosen >= g.start) & (chosen < g.stop)).sum() for g in groups]).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts.tolist(), expected.tolist(), chi2)
    sd = (expected * (1 - expected / n)).sqrt()
    assert ((counts - expected).abs() <= 4 * sd + 1).all(), (counts.tolist(), expected.tolist())
    assert counts[4] > 300 and counts[5] <= 12  # the far band is really sampled, the farther one rarely

    band = chosen[(chosen >= 4) & (chosen < 1024)]
    sub = torch.bincount((band - 4) // 128, minlength=8).double()
    sub_expected = torch.tensor([128.0] * 7 + [124.0]) / 1020 * band.numel()  # all 1020 tokens equally likely
    sub_chi2 = float(((sub - sub_expected) ** 2 / sub_expected).sum())
    assert sub_chi2 < 24.3, (sub.tolist(), sub_expected.tolist())
