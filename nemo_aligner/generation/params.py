"""Sampling and length parameters, with NeMo-Aligner's ``sampling_params`` / ``length_params`` key names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemo_aligner.utils.config import ConfigValueError, config_schema, to_bool

#: NeMo ``sampling_params`` keys accepted and ignored here: ``add_BOS`` (BOS is decided by the tokenisation rules of
#: :func:`nemo_aligner.data.prompts.tokenize_prompt`), ``all_probs`` and ``compute_logprob`` (the trainers compute
#: log-probabilities with a separate forward pass, :meth:`AlignableModel.get_logprobs`).
IGNORED_SAMPLING_KEYS = ("add_BOS", "all_probs", "compute_logprob")


def _get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _check_known(cfg: Any, known: tuple[str, ...], section: str) -> None:
    if cfg is None or not hasattr(cfg, "keys"):
        return
    for key in cfg.keys():
        if key not in known:
            raise ConfigValueError(f"{section}: unknown key {key!r}; known keys are {sorted(known)}")


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _unescape(text: str) -> str:
    """``\\n`` -> newline, ``\\t`` -> tab, ``\\\\`` -> backslash; any other backslash is kept as it is."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@config_schema("generation", main="generation.sampling_params")
@config_schema("gpt_ppo_actor", main="model.ppo.sampling_params")
@config_schema("gpt_rs_actor", main="model.rs.sampling_params")
@dataclass
class SamplingParams:
    """How the next token is chosen (NeMo-Aligner ``sampling_params``). The fields are the type and default of each
    key of the ``sampling_params`` sections of ``conf/generation.yaml``, ``gpt_ppo_actor.yaml`` and
    ``gpt_rs_actor.yaml`` (:func:`~nemo_aligner.utils.config.config_schema`); the defaults are the neutral values
    (no filtering, no penalty) that all three files use.

    Attributes:
        use_greedy: pick the arg-max token (then ``temperature``, ``top_k`` and ``top_p`` are ignored).
        temperature: logits are divided by it before sampling (> 0).
        top_k: keep only the ``k`` most likely tokens (``0`` = no limit) (Fan et al. 2018, "Hierarchical Neural
            Story Generation").
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability mass reaches
            ``top_p`` (``1.0`` = no limit) (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").
        repetition_penalty: a token already present in the prompt or the response has its logit divided by it
            when positive, multiplied by it when negative (``1.0`` = off) (Keskar et al. 2019, CTRL, section 4.1).
        end_strings: stop a response as soon as its decoded text ends with one of these strings (the matching
            tokens are kept in the response). The two-character escapes ``\\n``, ``\\t`` and ``\\\\`` are read as a
            newline, a tab and a backslash, because Hydra passes a command-line ``end_strings=["\\n\\nHuman:"]``
            through literally.

    Raises:
        ValueError: ``temperature <= 0`` (without greedy), ``top_k < 0``, ``top_p`` outside ``(0, 1]``,
            ``repetition_penalty <= 0``, or an empty end string.
    """

    use_greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    end_strings: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.use_greedy = to_bool(self.use_greedy, "sampling_params.use_greedy")
        self.temperature = float(self.temperature)
        self.top_k = int(self.top_k)
        self.top_p = float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.end_strings = [_unescape(str(s)) for s in (self.end_strings or [])]
        if not self.use_greedy and not self.temperature > 0:
            raise ConfigValueError(f"sampling_params.temperature={self.temperature}: must be > 0 (or set use_greedy=true)")
        if self.top_k < 0:
            raise ConfigValueError(f"sampling_params.top_k={self.top_k}: must be >= 0 (0 = no top-k filtering)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigValueError(f"sampling_params.top_p={self.top_p}: must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise ConfigValueError(f"sampling_params.repetition_penalty={self.repetition_penalty}: must be > 0 (1.0 = off)")
        if any(not s for s in self.end_strings):
            raise ConfigValueError("sampling_params.end_strings: empty strings are not allowed")

    @property
    def is_greedy(self) -> bool:
        """True when the choice is deterministic: ``use_greedy`` or ``top_k == 1``."""
        return self.use_greedy or self.top_k == 1

    @classmethod
    def from_cfg(cls, cfg: Any) -> "SamplingParams":
        """Build from a NeMo-Aligner ``sampling_params`` section (dict or DictConfig; ``None`` = defaults).

        Keys: ``use_greedy``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``end_strings``;
        NeMo's ``add_BOS``, ``all_probs`` and ``compute_logprob`` are accepted and have no effect here (see
        :data:`IGNORED_SAMPLING_KEYS`). Null values mean the default.

        Raises:
            ValueError: an unknown key or an out-of-range value.
        """
        known = ("use_greedy", "temperature", "top_k", "top_p", "repetition_penalty", "end_strings")
        _check_known(cfg, known + IGNORED_SAMPLING_KEYS, "sampling_params")
        default = cls()
        return cls(**{k: _get(cfg, k, getattr(default, k)) for k in known})


@config_schema("generation", main="generation.length_params")
@config_schema("gpt_ppo_actor", main="model.ppo.length_params")
@config_schema("gpt_rs_actor", main="model.rs.length_params")
@dataclass
class LengthParams:
    """Response length limits in tokens (NeMo-Aligner ``length_params``). The fields are the type and default of
    each ``length_params`` key (:func:`~nemo_aligner.utils.config.config_schema`); the defaults are
    ``conf/generation.yaml``'s, and the PPO and RS files set their recipes' own values (64 and 1), which win.

    Attributes:
        max_length: the most NEW tokens generated per response (the prompt is not counted), EOS included.
        min_length: EOS and end strings are ignored until the response has this many tokens.

    Raises:
        ValueError: ``max_length < 0``, ``min_length < 0`` or ``min_length > max_length``.
    """

    max_length: int = 256
    min_length: int = 0

    def __post_init__(self):
        self.max_length = int(self.max_length)
        self.min_length = int(self.min_length)
        if self.max_length < 0 or self.min_length < 0:
            raise ConfigValueError(f"length_params: max_length={self.max_length}, min_length={self.min_length} must be >= 0")
        if self.min_length > self.max_length:
            raise ConfigValueError(f"length_params.min_length={self.min_length} exceeds max_length={self.max_length}")

    @classmethod
    def from_cfg(cls, cfg: Any) -> "LengthParams":
        """Build from a NeMo-Aligner ``length_params`` section (``max_length``, ``min_length``; ``None`` = defaults).

        Raises:
            ValueError: an unknown key or an out-of-range value.
        """
        _check_known(cfg, ("max_length", "min_length"), "length_params")
        default = cls()
        return cls(**{k: _get(cfg, k, getattr(default, k)) for k in ("max_length", "min_length")})


@dataclass
class GenerationOutput:
    """What :func:`nemo_aligner.generation.generate` returns, one entry per prompt, in prompt order.

    Attributes:
        response_ids: the new tokens of each response (no prompt, no padding), ending with the EOS token when one
            was generated.
        ended: True when the response stopped by itself (an EOS token or an end string), False when it was cut
            at ``max_length``.
        logprobs: the engine's log-probability (nats) of each response token, one list per response, when the
            engine reports them (vLLM); None from the native engine (the trainers compute their own).
    """

    response_ids: list[list[int]]
    ended: list[bool]
    logprobs: list[list[float]] | None = None
