"""Rollouts: sampled responses to prompts, with what the online algorithms (PPO, rejection sampling) compute about
them, as one typed batch of flat tensors.

Modelled on torchtune's ``Trajectory`` (``torchtune/rlhf/_types.py``): a dataclass of tensors with one entry per
rollout or per token, instead of a list of dicts of Python lists. A batch of ``S`` rollouts: rollout ``s`` is
``prompt_lengths[s]`` prompt tokens followed by ``response_lengths[s]`` response tokens. Token fields are *flat*:
the tokens of rollout 0, then those of rollout 1, ... -- for the response tokens the order of the targets of the
:class:`~nemo_aligner.data.sequences.SequenceBatch` the rollouts build (:meth:`Rollouts.sequence_batch`) and of
the flat layout of :mod:`nemo_aligner.algorithms.ppo_math`.

======================  ==========  ========  ==========================================================
field                   shape       dtype     meaning
======================  ==========  ========  ==========================================================
``prompt_ids``          ``[P]``     int64     prompt tokens, ``P = sum(prompt_lengths)``
``prompt_lengths``      ``[S]``     int64     prompt tokens per rollout (>= 1)
``response_ids``        ``[N]``     int64     response tokens, ``N = sum(response_lengths)``
``response_lengths``    ``[S]``     int64     response tokens per rollout (>= 1)
``ended``               ``[S]``     bool      the response stopped by itself (EOS or an end string)
``prompt_index``        ``[S]``     int64     index of the rollout's prompt in the list it was sampled for
``sample_index``        ``[S]``     int64     which of that prompt's samples it is (0, 1, ...)
``rewards``             ``[S]``     float64   reward-model score (``None`` until scored)
``logprobs``            ``[N]``     float32   the rollout policy's log-probabilities (nats), or ``None``
``init_logprobs``       ``[N]``     float32   the initial policy's log-probabilities (nats), or ``None``
``values``              ``[N]``     float32   the critic's values at rollout time, or ``None``
``advantages``          ``[N]``     float32   GAE advantages, or ``None``
``returns``             ``[N]``     float32   GAE returns (the critic's targets), or ``None``
``engine_logprobs``     ``[N]``     float32   the rollout engine's own log-probabilities of the sampled tokens
                                              (vLLM; NaN where unknown), or ``None`` (the native engine)
======================  ==========  ========  ==========================================================

Every value a float field holds is exactly what the algorithms compute in float32 (or, for rewards, in Python
floats); converting to and from Python lists (:meth:`Rollouts.per_sequence`, :meth:`Rollouts.per_token`, the JSON
payload) is exact.

The JSON payload of the critic and initial-policy servers (:meth:`Rollouts.to_payload`,
:meth:`Rollouts.from_payload`) is ``{"token_ids": [[int]], "prompt_lengths": [int]}`` (prompt then response tokens
of each rollout) plus, for critic training, one list of floats per rollout for each per-token field sent
(``"values"``, ``"returns"``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from nemo_aligner.data.sequences import SequenceBatch, collate_sequences

#: Fields with one entry per rollout.
SEQUENCE_FIELDS = ("prompt_lengths", "response_lengths", "ended", "prompt_index", "sample_index", "rewards")
#: Float fields with one entry per response token (``response_ids`` is the int64 one).
TOKEN_FLOAT_FIELDS = ("logprobs", "init_logprobs", "values", "advantages", "returns", "engine_logprobs")


class PayloadError(ValueError):
    """A server request's rollouts are malformed (the message names the field and item); a server answers 422."""


def _int_list(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in values)


@dataclass
class Rollouts:
    """``S`` rollouts as flat tensors (see the module docstring for every field's shape, dtype and meaning).

    Build one with :meth:`from_lists` (generation, tests) or :meth:`from_payload` (a server request); the optional
    fields (``rewards`` and the per-token floats) start as ``None`` and are set by the algorithm that computes them
    (``rollouts.rewards = ...``). Indexing and batching (:meth:`select`, :meth:`split`, :meth:`cat`) carry every
    field along.

    Raises:
        ValueError: fields of inconsistent shapes, or a prompt or response of no token.
    """

    prompt_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    response_ids: torch.Tensor
    response_lengths: torch.Tensor
    ended: torch.Tensor
    prompt_index: torch.Tensor
    sample_index: torch.Tensor
    rewards: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    init_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s = self.prompt_lengths.numel()
        for name in SEQUENCE_FIELDS:
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (s,):
                raise ValueError(f"rollouts: {name} has shape {tuple(value.shape)}, expected ({s},)")
        if self.prompt_ids.shape != (int(self.prompt_lengths.sum()),):
            raise ValueError(f"rollouts: prompt_ids has shape {tuple(self.prompt_ids.shape)}, expected "
                             f"({int(self.prompt_lengths.sum())},) (the sum of prompt_lengths)")
        n = int(self.response_lengths.sum())
        for name in ("response_ids", *TOKEN_FLOAT_FIELDS):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(f"rollouts: {name} has shape {tuple(value.shape)}, expected ({n},) (one entry per "
                                 "response token)")
        if s and (int(self.prompt_lengths.min()) < 1 or int(self.response_lengths.min()) < 1):
            raise ValueError("rollouts: every prompt and every response needs at least one token")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        ended: Sequence[bool] | None = None,
        prompt_index: Sequence[int] | None = None,
        sample_index: Sequence[int] | None = None,
        rewards: Sequence[float] | None = None,
        **per_token: Sequence[Sequence[float]] | None,
    ) -> "Rollouts":
        """Rollouts of the given prompt and response token ids (one list each per rollout).

        Args:
            ended: default all ``False``; prompt_index: default ``0..S-1``; sample_index: default all 0.
            rewards: one float per rollout (default ``None``: not scored).
            per_token: any of :data:`TOKEN_FLOAT_FIELDS`, one list of floats per rollout (one per response token).

        Raises:
            ValueError: lists of different lengths, an unknown per-token field, or a per-token list of the wrong
                length.
        """
        s = len(prompts)
        if len(responses) != s:
            raise ValueError(f"{s} prompts but {len(responses)} responses")
        for name, value in (("ended", ended), ("prompt_index", prompt_index), ("sample_index", sample_index),
                            ("rewards", rewards)):
            if value is not None and len(value) != s:
                raise ValueError(f"{name} has {len(value)} entries for {s} rollouts")
        unknown = sorted(set(per_token) - set(TOKEN_FLOAT_FIELDS))
        if unknown:
            raise ValueError(f"unknown per-token rollout fields {unknown}; known: {list(TOKEN_FLOAT_FIELDS)}")
        as_long = lambda values: torch.tensor(list(values), dtype=torch.long)  # noqa: E731
        out = cls(
            prompt_ids=as_long(t for p in prompts for t in p),
            prompt_lengths=as_long(len(p) for p in prompts),
            response_ids=as_long(t for r in responses for t in r),
            response_lengths=as_long(len(r) for r in responses),
            ended=torch.tensor([bool(e) for e in ended] if ended is not None else [False] * s, dtype=torch.bool),
            prompt_index=as_long(prompt_index if prompt_index is not None else range(s)),
            sample_index=as_long(sample_index if sample_index is not None else [0] * s),
            rewards=torch.tensor([float(r) for r in rewards], dtype=torch.float64) if rewards is not None else None,
        )
        for name, lists in per_token.items():
            if lists is not None:
                setattr(out, name, out.per_token(lists, name))
        return out

    @classmethod
    def cat(cls, parts: Sequence["Rollouts"]) -> "Rollouts":
        """The rollouts of ``parts``, in order. An optional field is kept when every part has it.

        Raises:
            ValueError: no parts.
        """
        if not parts:
            raise ValueError("Rollouts.cat needs at least one batch")
        values = {}
        for f in dataclasses.fields(cls):
            pieces = [getattr(p, f.name) for p in parts]
            values[f.name] = None if any(x is None for x in pieces) else torch.cat(pieces)
        return cls(**values)

    # ---- sizes and per-rollout views ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.prompt_lengths.numel())

    @property
    def num_response_tokens(self) -> int:
        """``N``, the response tokens of all rollouts."""
        return int(self.response_ids.numel())

    def prompts(self) -> list[list[int]]:
        """Each rollout's prompt token ids."""
        return [p.tolist() for p in self.prompt_ids.split(self.prompt_lengths.tolist())]

    def responses(self) -> list[list[int]]:
        """Each rollout's response token ids."""
        return [r.tolist() for r in self.response_ids.split(self.response_lengths.tolist())]

    def sequences(self) -> list[list[int]]:
        """Each rollout's prompt then response token ids (what the policy, critic and reward model read)."""
        return [p + r for p, r in zip(self.prompts(), self.responses())]

    def token_seq_id(self) -> torch.Tensor:
        """``[N]`` int64: the rollout of each response token (non-decreasing)."""
        return torch.repeat_interleave(torch.arange(len(self)), self.response_lengths)

    def per_sequence(self, flat: torch.Tensor) -> list[list[float]]:
        """Cut a flat per-response-token tensor ``[N]`` into one list of Python floats per rollout (exact for
        float32 values)."""
        values = flat.detach().float().cpu().tolist()
        out, start = [], 0
        for n in self.response_lengths.tolist():
            out.append(values[start : start + n])
            start += n
        return out

    def per_token(self, lists: Sequence[Sequence[float]], name: str = "values") -> torch.Tensor:
        """The flat ``[N]`` float32 tensor of one list of floats per rollout (inverse of :meth:`per_sequence`).

        Raises:
            ValueError: not one list per rollout, or a list whose length is not its rollout's response length
                (``name`` names the field in the message).
        """
        if len(lists) != len(self):
            raise ValueError(f"{name}: {len(lists)} lists for {len(self)} rollouts")
        for i, (values, n) in enumerate(zip(lists, self.response_lengths.tolist())):
            if len(values) != n:
                raise ValueError(f"{name}[{i}] has {len(values)} entries for a response of {n} tokens")
        return torch.tensor([v for values in lists for v in values], dtype=torch.float32)

    # ---- indexing and batching ----------------------------------------------------------------------------------
    def select(self, indices: Iterable[int]) -> "Rollouts":
        """The rollouts ``indices`` (any order, repeats allowed), with every field."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        values = {name: (None if getattr(self, name) is None else getattr(self, name)[idx]) for name in SEQUENCE_FIELDS}
        values["prompt_ids"] = self.prompt_ids[_token_index(self.prompt_lengths, idx)]
        tokens = _token_index(self.response_lengths, idx)
        for name in ("response_ids", *TOKEN_FLOAT_FIELDS):
            value = getattr(self, name)
            values[name] = None if value is None else value[tokens]
        return Rollouts(**values)

    def split(self, micro_batch_size: int) -> list["Rollouts"]:
        """Consecutive micro-batches of ``micro_batch_size`` rollouts (the last one may be smaller).

        Raises:
            ValueError: ``micro_batch_size < 1``.
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        return [self.select(range(start, min(start + micro_batch_size, len(self))))
                for start in range(0, len(self), micro_batch_size)]

    def sequence_batch(self, pad_token_id: int, pack: bool = False, max_row_length: int | None = None) -> SequenceBatch:
        """The model batch of these rollouts (:func:`~nemo_aligner.data.sequences.collate_sequences`): prompt then
        response tokens, the response tokens the targets (``targets`` = ``response_ids``, ``target_lengths`` =
        ``response_lengths``).

        Raises:
            ValueError: as :func:`~nemo_aligner.data.sequences.collate_sequences` (no rollouts).
        """
        examples = [{"input_ids": ids, "prompt_length": n}
                    for ids, n in zip(self.sequences(), self.prompt_lengths.tolist())]
        return collate_sequences(examples, int(pad_token_id), pack=pack, max_row_length=max_row_length)

    # ---- the servers' JSON payload ------------------------------------------------------------------------------
    def to_payload(self, per_token: Sequence[str] = ()) -> dict:
        """``{"token_ids": [[int]], "prompt_lengths": [int]}`` plus ``{name: [[float]]}`` for each field named in
        ``per_token`` (see the module docstring)."""
        payload: dict[str, Any] = {"token_ids": self.sequences(), "prompt_lengths": self.prompt_lengths.tolist()}
        for name in per_token:
            payload[name] = self.per_sequence(getattr(self, name))
        return payload

    @classmethod
    def from_payload(cls, body: Any, vocab_size: int | None = None, per_token: Sequence[str] = ()) -> "Rollouts":
        """Parse (and check) a server request: the inverse of :meth:`to_payload`. Each rollout is one prompt
        (``prompt_index`` its position in the request, ``sample_index`` 0), not ended.

        Raises:
            PayloadError: missing or mismatched fields, non-integer ids, ids outside ``[0, vocab_size)``, a prompt
                length that leaves no response token, or a per-token field without one number per response token.
        """
        body = body if isinstance(body, dict) else {}
        ids, lengths = body.get("token_ids"), body.get("prompt_lengths")
        if not isinstance(ids, list) or not isinstance(lengths, list) or not ids or len(ids) != len(lengths):
            raise PayloadError("send non-empty lists 'token_ids' and 'prompt_lengths' of the same length")
        for i, (seq, n) in enumerate(zip(ids, lengths)):
            if not _int_list(seq):
                raise PayloadError(f"token_ids[{i}] must be a list of integers")
            if vocab_size is not None and any(t < 0 or t >= vocab_size for t in seq):
                raise PayloadError(f"token_ids[{i}] holds an id outside the vocabulary [0, {vocab_size})")
            if not isinstance(n, int) or not 1 <= n < len(seq):
                raise PayloadError(f"prompt_lengths[{i}]={n!r} must be an integer in [1, {len(seq) - 1}]")
        out = cls.from_lists([seq[:n] for seq, n in zip(ids, lengths)], [seq[n:] for seq, n in zip(ids, lengths)])
        for name in per_token:
            values = body.get(name)
            if not isinstance(values, list) or len(values) != len(ids):
                raise PayloadError(f"'{name}' must be a list with one list of floats per sequence")
            for i, (v, seq, n) in enumerate(zip(values, ids, lengths)):
                if not isinstance(v, list) or len(v) != len(seq) - n or not all(isinstance(x, (int, float)) for x in v):
                    raise PayloadError(f"{name}[{i}] must hold {len(seq) - n} numbers (one per response token)")
            setattr(out, name, out.per_token([[float(x) for x in v] for v in values], name))
        return out


def _token_index(lengths: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Positions in a flat token tensor (``lengths[s]`` tokens per sequence) of the tokens of sequences ``idx``."""
    starts = torch.cumsum(lengths, 0) - lengths
    chosen = lengths[idx]
    total = int(chosen.sum())
    offsets = torch.cumsum(chosen, 0) - chosen
    return torch.arange(total) + torch.repeat_interleave(starts[idx] - offsets, chosen)
