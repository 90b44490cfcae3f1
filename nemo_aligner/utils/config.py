"""Config checks: every key a user sets must be one the recipe knows (typos are errors, not silent defaults)."""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
import typing
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_aligner.errors import MissingDependencyError, MissingFileError, UserError

#: Sections whose contents are passed through to another library and are therefore not checked (Ray's resource
#: names are the cluster's own, e.g. custom resources; nemo_aligner.recipes.ray_train checks their amounts).
OPEN_SECTIONS = ("hydra", "exp_manager.wandb_logger_kwargs", "trainer.ray.resources_per_worker",
                 "trainer.ppo.ray.resources_per_worker", "trainer.ray.runtime_env", "trainer.ppo.ray.runtime_env")



def _find_conf_dir() -> Path:
    """The directory of the reference YAML files: ``nemo_aligner/conf/`` inside an installed package (a wheel or a
    regular ``pip install .``: setup.py copies the repository's ``conf/`` there at build time), else the repository's
    own ``conf/`` (an editable install or a checkout on ``PYTHONPATH``)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "conf"
    if (installed / "gpt_dpo.yaml").is_file():
        return installed
    return package.parent / "conf"


#: The reference configs: the ``config_path`` of every entry script and the schemas of :func:`load_schema`.
CONF_DIR = _find_conf_dir()


class ConfigKeyError(UserError, KeyError):
    """An unknown configuration key; the message names it and suggests the closest known key."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def _flatten(cfg: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            if not any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS):
                yield from _flatten(cfg._get_node(key), path)


def check_keys(cfg: DictConfig, schema: DictConfig, source: str = "config") -> None:
    """Raise :class:`ConfigKeyError` for the first key of ``cfg`` that ``schema`` lacks.

    Values are not resolved (interpolations stay untouched). Keys under :data:`OPEN_SECTIONS` are not checked.

    Raises:
        ConfigKeyError: naming the full dotted key and the closest known key, e.g.
            ``unknown config key 'trainer.dpo.max_epoch' (did you mean 'trainer.dpo.max_epochs'?)``.
    """
    known = set(_flatten(schema))
    for key in _flatten(cfg):
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigKeyError(f"unknown config key '{key}' in {source}{hint}")


def load_schema(name: str) -> DictConfig:
    """The reference YAML ``conf/<name>.yaml`` that defines the keys a recipe accepts.

    Raises:
        FileNotFoundError: no such file in ``conf/``.
    """
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise MissingFileError(f"no reference config {path}")
    return OmegaConf.load(path)


def as_list(value: Any) -> list:
    """``None`` -> ``[]``, a scalar -> ``[value]``, a list/ListConfig -> list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


# ---- values -------------------------------------------------------------------------------------------------------


class ConfigValueError(UserError, ValueError):
    """A configuration value that is out of range or of the wrong type; the message names the dotted key, the value
    and what is expected, e.g. ``model.micro_batch_size=0: expected an integer >= 1``."""


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _fail(key: str, value: Any, expected: str) -> ConfigValueError:
    return ConfigValueError(f"{key}={'null' if value is None else repr(value)}: expected {expected}")


def to_bool(value: Any, key: str) -> bool:
    """A boolean config value: ``True``/``False``, the integers 1/0, or one of the strings ``true/false``,
    ``1/0``, ``yes/no`` (any case, surrounding spaces ignored).

    Raises:
        ConfigValueError: anything else (naming ``key``).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _fail(key, value, "a boolean (true/false, 1/0, yes/no)")


def to_int(value: Any, key: str) -> int:
    """An integer config value: an int, a float with no fractional part (``2.0``), or a string of one (``"2"``).

    Raises:
        ConfigValueError: a bool, a fractional number (``2.5`` is never truncated), or anything else.
    """
    if isinstance(value, bool):
        raise _fail(key, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
        except ValueError:
            raise _fail(key, value, "an integer") from None
        if isinstance(value, int):
            return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise _fail(key, value, "an integer")


def to_float(value: Any, key: str) -> float:
    """A finite real config value: an int, a float or a string of one (``"5e-6"``).

    Raises:
        ConfigValueError: a bool, NaN, an infinity, or anything else.
    """
    if isinstance(value, bool):
        raise _fail(key, value, "a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _fail(key, value, "a number") from None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise _fail(key, value, "a finite number")


def full_key(section: Any, key: str) -> str:
    """The dotted config key of ``section[key]`` (``trainer.dpo.max_steps`` for the ``trainer.dpo`` node of a
    full config), for error messages; just ``key`` for a plain mapping or a detached section."""
    if isinstance(section, DictConfig):
        try:
            return section._get_full_key(key) or key
        except Exception:
            return key
    return key


_CONVERTERS: dict[type, Callable[[Any, str], Any]] = {bool: to_bool, int: to_int, float: to_float}


def coerce(value: Any, kind: type, key: str) -> Any:
    """``value`` as ``kind`` (``bool``, ``int``, ``float`` through :func:`to_bool`, :func:`to_int`,
    :func:`to_float`; ``str`` for scalars; other kinds unchanged).

    Raises:
        ConfigValueError: ``value`` is not a valid ``kind`` (naming ``key``).
    """
    if kind in _CONVERTERS:
        return _CONVERTERS[kind](value, key)
    if kind is str:
        if isinstance(value, (dict, list, tuple, DictConfig, ListConfig)):
            raise _fail(key, value, "a string")
        return str(value)
    return value


def dataclass_from_cfg(cls: type, cfg: Any, section: str) -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``cfg`` (the config section ``section``): every field
    present in ``cfg`` is converted with :func:`coerce` to its annotated type (``bool``, ``int``, ``float``, ``str``;
    ``X | None`` also accepts null); keys that are not fields are ignored, missing fields keep their defaults.

    Raises:
        ConfigValueError: a value of the wrong type, naming ``<section>.<field>``.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in cls.__dataclass_fields__:
        if name not in cfg:
            continue
        value = cfg[name]
        kinds = [k for k in typing.get_args(hints[name]) or (hints[name],) if k is not type(None)]
        if value is None and len(kinds) < len(typing.get_args(hints[name]) or (hints[name],)):
            kwargs[name] = None
            continue
        kwargs[name] = coerce(value, kinds[0], f"{section}.{name}") if len(kinds) == 1 else value
    return cls(**kwargs)


# ---- the value rules of the training recipes ----------------------------------------------------------------------

Rule = Callable[[Any, str], Any]
"""A value rule: ``rule(value, key)`` returns the normalised value or raises :class:`ConfigValueError`."""


def number(kind: type = float, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, nullable: bool = False, also: tuple = (), note: str = "") -> Rule:
    """A rule for an ``int`` or ``float`` value in the range ``[low, high]`` (``low_open``/``high_open``: exclusive
    bounds); ``nullable``: null is allowed; ``also``: extra accepted values (e.g. ``-1`` for "unlimited");
    ``note``: what else is accepted, for the message."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    what = ("an integer" if kind is int else "a number") + (" " if lo or hi else "") + " and ".join(x for x in (lo, hi) if x)
    what += "".join(f" or {a}" for a in also) + (f" or {note}" if note else "") + (" or null" if nullable else "")

    def rule(value: Any, key: str) -> Any:
        if value is None and nullable:
            return None
        if value is None:
            raise _fail(key, value, what)
        try:
            out = coerce(value, kind, key)
        except ConfigValueError:
            raise _fail(key, value, what) from None
        if out in also:
            return out
        if low is not None and (out < low or (low_open and out == low)):
            raise _fail(key, value, what)
        if high is not None and (out > high or (high_open and out == high)):
            raise _fail(key, value, what)
        return out

    return rule


def boolean(value: Any, key: str) -> bool:
    """Rule: :func:`to_bool`."""
    return to_bool(value, key)


def choice(*options: str, nullable: bool = False) -> Rule:
    """A rule for a string that is one of ``options`` (compared case-insensitively; returned as given)."""

    def rule(value: Any, key: str) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, str) and value.strip().lower() in [o.lower() for o in options]:
            return value
        raise _fail(key, value, "one of " + ", ".join(options) + (" or null" if nullable else ""))

    return rule


def text(nullable: bool = False) -> Rule:
    """A rule for a non-empty string (``nullable``: or null). Numbers are accepted as their string."""

    def rule(value: Any, key: str) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
            return value
        raise _fail(key, value, "a non-empty string" + (" or null" if nullable else ""))

    return rule


def files(value: Any, key: str) -> list:
    """Rule: one file path or a non-empty list of them (what a training split needs)."""
    paths = as_list(value)
    if not paths or any(not isinstance(p, str) or not p.strip() for p in paths):
        raise _fail(key, value, "a file path or a non-empty list of file paths")
    return value


def number_list(length: int, low: float, high: float) -> Rule:
    """A rule for a list of exactly ``length`` numbers, each in ``[low, high)`` (e.g. Adam's ``betas``)."""

    def rule(value: Any, key: str) -> Any:
        items = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
        what = f"a list of {length} numbers in [{low:g}, {high:g})"
        if items is None or len(items) != length:
            raise _fail(key, OmegaConf.to_object(value) if isinstance(value, ListConfig) else value, what)
        out = []
        for i, item in enumerate(items):
            try:
                x = to_float(item, f"{key}[{i}]")
            except ConfigValueError:
                raise _fail(key, list(items), what) from None
            if not low <= x < high:
                raise _fail(key, list(items), what)
            out.append(x)
        return out

    return rule


def _devices(value: Any, key: str) -> Any:
    if isinstance(value, str) and (value.strip().lower() == "auto" or value.strip().lstrip("-").isdigit()):
        return value
    if isinstance(value, (list, tuple, ListConfig)) and value and all(isinstance(v, int) for v in value):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = to_int(value, key) if not isinstance(value, float) or value.is_integer() else None
        if n is not None and (n >= 1 or n == -1):
            return n
    raise _fail(key, value, "a number of devices >= 1, -1 (all), 'auto' or a list of device indices")


_PRECISION_ALIASES = {
    "32": "32-true",
    "32-true": "32-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16-true": "bf16-true",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "16-true": "16-true",
}


def normalize_precision(value: Any) -> str:
    """Map NeMo/Lightning precision spellings (``32``, ``bf16``, ``bf16-mixed``, ``16`` ...) to Fabric's.

    Raises:
        ConfigValueError: an unknown spelling.
    """
    key = str(value).strip().lower()
    if key not in _PRECISION_ALIASES:
        raise ConfigValueError(f"trainer.precision={value!r}: use one of {sorted(set(_PRECISION_ALIASES))}")
    return _PRECISION_ALIASES[key]


def _precision(value: Any, key: str) -> Any:
    try:
        normalize_precision(value)
    except ValueError as err:
        raise ConfigValueError(str(err)) from None
    return value


#: The values of ``model.attn_implementation`` the models accept: transformers' built-in attention implementations
#: (``flash_attention_*`` need the ``flash-attn`` package and a GPU; the packed and shared-prefix layouts need
#: ``sdpa`` or ``eager``).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_attn_implementation(value: Any, key: str = "model.attn_implementation") -> Any:
    """Rule: one of :data:`ATTN_IMPLEMENTATIONS` (null: the model's default).

    Raises:
        ConfigValueError: anything else, naming ``key`` and the accepted values.
    """
    if value is None or (isinstance(value, str) and value.strip() in ATTN_IMPLEMENTATIONS):
        return value
    raise _fail(key, value, "one of " + ", ".join(ATTN_IMPLEMENTATIONS))


def check_accelerator(value: Any, key: str = "trainer.accelerator") -> Any:
    """Rule: ``auto``, ``cpu``, ``gpu``, ``cuda``, ``mps`` or ``tpu``, where ``tpu`` needs the ``torch_xla`` package
    and ``mps`` an Apple MPS device (whether a CUDA device is visible is checked where the processes start,
    :func:`nemo_aligner.utils.runtime.build_fabric`: a Ray driver may have none while its workers do).

    Raises:
        ConfigValueError: an unknown accelerator, or ``mps`` without an MPS device (naming ``key``).
        MissingDependencyError: ``tpu`` without ``torch_xla`` installed.
    """
    out = choice("auto", "cpu", "gpu", "cuda", "mps", "tpu")(value, key)
    name = out.strip().lower()
    if name == "tpu" and importlib.util.find_spec("torch_xla") is None:
        raise MissingDependencyError(f"{key}=tpu needs torch_xla, which is not installed: `pip install torch_xla` on a "
                                     f"TPU machine, or set {key}=auto (GPU if visible, else CPU)")
    if name == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigValueError(f"{key}=mps: no Apple MPS device on this machine; set {key}=auto or cpu")
    return out


def _limit_batches(value: Any, key: str) -> Any:
    """Rule of ``limit_val_batches`` / ``limit_train_batches``: an int is a batch count >= 0, a float a fraction >= 0
    (never negative: -1 is not "all", 1.0 is)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
        raise _fail(key, value, "a batch count >= 0 (an integer) or a fraction >= 0 (1.0: all batches)")
    return number(float, 0, note="a batch count >= 0")(value, key)


def _wandb_logger(value: Any, key: str) -> bool:
    """Rule: a boolean; true needs the ``wandb`` package."""
    out = to_bool(value, key)
    if out and importlib.util.find_spec("wandb") is None:
        raise MissingDependencyError(f"{key}=true needs wandb, which is not installed: `pip install wandb`, or set "
                                     f"{key}=false")
    return out


def _template_fields(template: str, key: str) -> set[str]:
    import jinja2
    import jinja2.meta

    try:
        return set(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    except jinja2.TemplateSyntaxError as err:
        raise ConfigValueError(f"{key}: not a valid Jinja template (line {err.lineno}: {err.message})") from None


def jinja_template(required: tuple[str, ...], allowed: tuple[str, ...], nullable: bool = False) -> Rule:
    """A rule for a non-empty Jinja template that uses every field in ``required`` (``{{ response }}``) and no
    field outside ``allowed`` (a typo such as ``{{ promt }}``); ``nullable``: null is allowed.

    Raises:
        ConfigValueError: naming the key and the missing (or unknown) ``{{ field }}``.
    """
    def rule(value: Any, key: str) -> Any:
        value = text(nullable=nullable)(value, key)
        if value is None:
            return None
        fields = _template_fields(str(value), key)
        missing = [f for f in required if f not in fields]
        if missing:
            raise ConfigValueError(f"{key}: the template has no {{{{ {missing[0]} }}}} slot; add it (the template's "
                                   f"fields: {', '.join(allowed)})")
        unknown = sorted(fields - set(allowed))
        if unknown:
            raise ConfigValueError(f"{key}: the template uses {{{{ {unknown[0]} }}}}, which is not one of its fields "
                                   f"({', '.join(allowed)})")
        return value

    return rule


#: The slot of a NeMo-Aligner reward regex (``"Score: {{ reward }}"``): the score's capture group goes there.
REWARD_SLOT = re.compile(r"\{\{ ?reward ?\}\}")


def reward_regex(value: Any, key: str) -> Any:
    """Rule: a reward regex with the ``{{ reward }}`` slot (``{{reward}}`` too) that compiles once the slot is
    replaced by a capture group.

    Raises:
        ConfigValueError: no slot, or not a valid regular expression (naming the key and ``re``'s reason).
    """
    value = text()(value, key)
    if not REWARD_SLOT.search(str(value)):
        raise ConfigValueError(f"{key}={value!r} has no '{{{{ reward }}}}' slot: put it where the score stands in "
                               "the judge's answer, e.g. 'Score: {{ reward }}'")
    try:
        re.compile(REWARD_SLOT.sub("(x)", str(value)))
    except re.error as err:
        raise ConfigValueError(f"{key}={value!r}: not a valid regular expression ({err})") from None
    return value


#: Rules shared by every training recipe, as ``(key pattern, rule)``; a pattern is an ``fnmatch`` pattern of the
#: dotted key (``*`` also matches dots). The first matching pattern decides. Keys without a rule get one from the
#: type of their default in the reference YAML (bool, int or float), so a string ``"false"`` is parsed and ``2.5``
#: for an integer key is an error, never truncated.
COMMON_RULES: list[tuple[str, Rule]] = [
    ("trainer.accelerator", check_accelerator),
    ("trainer.devices", _devices),
    ("trainer.num_nodes", number(int, 1)),
    ("trainer.precision", _precision),
    ("trainer.strategy", choice("auto", "ddp", "fsdp", "ddp_spawn", "dp", "single_device", "ddp_find_unused_parameters_true")),
    ("trainer.*.max_epochs", number(int, 1)),
    ("trainer.*.max_steps", number(int, 1, also=(-1,))),  # -1: no limit (max_epochs decides)
    ("trainer.*.val_check_interval", number(int, 0)),
    ("trainer.*.save_interval", number(int, 0)),
    ("trainer.*.limit_*_batches", _limit_batches),
    ("trainer.*.gradient_clip_val", number(float, 0)),
    ("pretrained_checkpoint.restore_from_path", text()),
    ("*.micro_batch_size", number(int, 1)),
    ("*.global_batch_size", number(int, 1)),
    ("model.encoder_seq_length", number(int, 2)),
    ("model.seed", number(int, 0)),
    ("*.attn_implementation", check_attn_implementation),
    ("*.peft.peft_scheme", choice("none", "lora")),
    ("*.lora_tuning.adapter_dim", number(int, 1)),
    ("*.lora_tuning.alpha", number(float, 0, low_open=True)),
    ("*.lora_tuning.adapter_dropout", number(float, 0, 1, high_open=True)),
    ("*.optim.name", choice("adamw", "adam", "distributed_fused_adam", "fused_adam")),
    ("*.optim.lr", number(float, 0, low_open=True)),
    ("*.optim.weight_decay", number(float, 0)),
    ("*.optim.betas", number_list(2, 0.0, 1.0)),
    ("*.optim.eps", number(float, 0, low_open=True)),
    ("*.optim.sched.warmup_steps", number(int, 0)),
    ("*.optim.sched.constant_steps", number(int, 0)),
    ("*.optim.sched.min_lr", number(float, 0)),
    ("model.data.truncation", choice("truncate", "drop")),
    ("model.data.cache_dir", text(nullable=True)),
    ("model.data.data_prefix.train", files),
    ("exp_manager.explicit_log_dir", text()),
    ("exp_manager.create_wandb_logger", _wandb_logger),
    ("exp_manager.checkpoint_callback_params.save_top_k", number(int, 0, also=(-1,))),
    ("exp_manager.checkpoint_callback_params.monitor", text()),
    ("exp_manager.checkpoint_callback_params.mode", choice("min", "max")),
    ("*.timeout", number(float, 0, low_open=True)),
]

#: Recipe-specific rules (by reference config name), checked before :data:`COMMON_RULES`.
RECIPE_RULES: dict[str, list[tuple[str, Rule]]] = {
    "gpt_dpo": [
        ("model.dpo.ref_policy_kl_penalty", number(float, 0, low_open=True)),
        ("model.dpo.preference_loss", choice("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl")),
        ("model.dpo.sft_average_log_probs", lambda v, k: None if v is None else to_bool(v, k)),
        ("model.dpo.preference_loss_weight", number(float, 0)),
        ("model.dpo.sft_loss_weight", number(float, 0)),
    ],
    "gpt_self_rewarding": [
        ("model.data.train_ds.file_path", files),
        ("model.data.validation_ds.file_path", lambda v, k: v if v is None else files(v, k)),
        ("model.spin.length_control", lambda v, k: _number_or_list(v, k, 0.0, 1.0, False)),
        ("model.spin.ref_policy_kl_penalty", lambda v, k: _number_or_list(v, k, 0.0, None, True)),
        ("model.spin.preference_loss", choice("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl")),
        ("model.spin.sft_average_log_probs", lambda v, k: None if v is None else to_bool(v, k)),
        ("model.spin.llm_judge_prompt", jinja_template(("response",), ("prompt", "response"), nullable=True)),
        ("model.spin.llm_meta_judge_prompt", jinja_template(("judgement_a", "judgement_b"),
                                                            ("prompt", "response", "judgement_a", "judgement_b"),
                                                            nullable=True)),
        ("model.spin.*judge_reward_regex", reward_regex),
        ("model.data.max_prompts", number(int, 0, nullable=True)),
    ],
    "gpt_sft": [
        ("model.data.train_ds.file_path", files),
        ("model.data.*.max_seq_length", number(int, 2)),
        ("model.data.*.truncation_method", choice("left", "right")),
        ("model.data.validation_ds.file_path", lambda v, k: v if v is None else files(v, k)),
    ],
    "training_rm": [
        ("model.reward_standardization.num_samples", number(int, 1, nullable=True)),
        ("model.reward_standardization.mean", number(float, nullable=True)),
        ("model.reward_standardization.std", number(float, 0, low_open=True, nullable=True)),
    ],
}

def _number_or_list(value: Any, key: str, low: float, high: float | None, low_open: bool) -> Any:
    """A number in range, or a non-empty list of them (a per-iteration schedule)."""
    rule = number(float, low, high, low_open=low_open)
    if isinstance(value, (list, tuple)):
        if not value:
            raise _fail(key, value, "a number or a non-empty list of numbers")
        return [rule(v, key) for v in value]
    return rule(value, key)


#: Where each recipe keeps its batch sizes (global, micro): SFT's are per dataset, as in NeMo-Aligner's gpt_sft.yaml.
BATCH_KEYS: dict[str, tuple[str, str]] = {
    "gpt_dpo": ("model.global_batch_size", "model.micro_batch_size"),
    "gpt_self_rewarding": ("model.global_batch_size", "model.micro_batch_size"),
    "gpt_rs_actor": ("model.global_batch_size", "model.micro_batch_size"),
    "training_rm": ("model.global_batch_size", "model.micro_batch_size"),
    "gpt_sft": ("model.data.train_ds.global_batch_size", "model.data.train_ds.micro_batch_size"),
}


def _leaves(cfg: Any, prefix: str = "") -> Iterable[str]:
    """Dotted keys of the scalar and list values of ``cfg`` (not of :data:`OPEN_SECTIONS`)."""
    for key in cfg.keys():
        path = f"{prefix}.{key}" if prefix else str(key)
        if any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS):
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_interpolation():
            yield from _leaves(node, path)
        else:
            yield path


def _select(cfg: DictConfig, key: str) -> Any:
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigValueError(f"{key}: {str(err).splitlines()[0]}") from None
    return OmegaConf.to_object(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _real(value: Any, key: str) -> Any:
    """Rule of a key whose default is a float: a finite number; an int stays an int (a count stays a count)."""
    out = to_float(value, key)
    return value if isinstance(value, int) else out


def world_size_of(cfg: DictConfig) -> int | None:
    """The number of processes ``trainer.devices`` x ``trainer.num_nodes`` will start, when the config says it
    (an int or a list of devices; ``$WORLD_SIZE`` under torchrun/SLURM wins), else None (``auto``, ``-1``)."""
    import os

    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"])
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, ListConfig):
        devices = len(devices)
    return devices * int(nodes) if isinstance(devices, int) and devices >= 1 else None


def check_values(cfg: DictConfig, schema: DictConfig, name: str) -> None:
    """Check every value of ``cfg`` (a config of the recipe ``conf/<name>.yaml``, whose keys
    :func:`check_keys` has accepted) against :data:`RECIPE_RULES` ``[name]``, :data:`COMMON_RULES`, the field types of
    the recipe's config dataclasses (:func:`apply_schema`; ``schema``'s defaults type the other keys), then the cross-key rules (``global_batch_size`` a multiple of ``micro_batch_size`` x the
    data-parallel size, ``min_lr <= lr``). Values are normalised in place (``"false"`` -> ``False``, ``2.0`` ->
    ``2``), so the recipe reads plain Python values afterwards. Runs in microseconds, before any data or model loads.

    Raises:
        ConfigValueError: the first bad value, as one line naming the dotted key, the value and what is expected.
    """
    from fnmatch import fnmatchcase

    rules = RECIPE_RULES.get(name, []) + COMMON_RULES
    try:
        defaults = OmegaConf.create(OmegaConf.to_container(schema, resolve=True))
    except Exception:  # an interpolation the reference YAML cannot resolve alone: type its keys by rules only
        defaults = schema
    for key in _leaves(cfg):
        value = _select(cfg, key)
        default = OmegaConf.select(defaults, key, default=None)
        if value is None and default is None:  # null where the reference config has null ("not set") is allowed
            continue
        rule = next((r for pattern, r in rules if fnmatchcase(key, pattern)), None)
        if rule is None:
            kind = schema_type_of(name, key) or type(default)  # the config dataclass's field type, else the YAML's
            if kind not in _CONVERTERS:
                continue
            if value is None:
                raise _fail(key, value, {bool: "a boolean", int: "an integer", float: "a number"}[kind])
            rule = _real if kind is float else _CONVERTERS[kind]
        normalised = rule(value, key)
        if type(normalised) is not type(value) or normalised != value:
            OmegaConf.update(cfg, key, normalised, merge=False, force_add=False)

    apply_schema(cfg, name)  # the types of the config dataclasses (keys whose YAML value is null included)
    check_batch_sizes(cfg, name, world_size_of(cfg) or 1)
    for optim in ("model.optim", "critic.optim"):
        lr, min_lr = OmegaConf.select(cfg, f"{optim}.lr"), OmegaConf.select(cfg, f"{optim}.sched.min_lr")
        if isinstance(lr, (int, float)) and isinstance(min_lr, (int, float)) and min_lr > lr:
            raise ConfigValueError(f"{optim}.sched.min_lr={min_lr:g} must not exceed {optim}.lr={lr:g}")


def check_batch_sizes(cfg: DictConfig, name: str, world_size: int) -> None:
    """Check that the recipe's global batch size is a multiple of its micro-batch size x ``world_size``
    (data-parallel ranks), naming the recipe's own keys (:data:`BATCH_KEYS`). Recipes call it again once Fabric
    has started, when the world size is known for sure (``trainer.devices=auto``).

    Raises:
        ConfigValueError: e.g. ``model.data.train_ds.global_batch_size=3 must be a multiple of
            model.data.train_ds.micro_batch_size=2 x data-parallel size 1``.
    """
    if name not in BATCH_KEYS:
        return
    gbs_key, mbs_key = BATCH_KEYS[name]
    gbs, mbs = OmegaConf.select(cfg, gbs_key), OmegaConf.select(cfg, mbs_key)
    if gbs % (mbs * world_size):
        raise ConfigValueError(f"{gbs_key}={gbs} must be a multiple of {mbs_key}={mbs} x data-parallel size {world_size}")


# ---- typed schemas: the config dataclasses as Hydra structured configs ---------------------------------------------
#
# One rule for every key a dataclass covers: the dataclass field is the one place of the key's type and of its
# default; the YAML file fills the dataclass's structured config with values (a key the YAML leaves out takes the
# field's default). A dataclass that serves one section of one recipe (DPOLossConfig, PPOConfig, RSConfig) has the
# shipped YAML's value as its default; one shared by several recipes (TrainerConfig, SamplingParams, LengthParams)
# has a neutral default and each YAML states its recipe's own value, which wins.
# tests/architecture/test_conf_compose.py checks both rules against every file of conf/.

_NO_DEFAULT = dataclasses.MISSING


def key(section: str = "", default: Any = _NO_DEFAULT, *, name: str | None = None, nullable: bool = False,
        default_factory: Any = _NO_DEFAULT) -> Any:
    """A field of a config dataclass read from the key ``<section>.<name>`` (``name`` defaults to the field's
    name; ``section`` names one of the sections given to :func:`config_schema` and :func:`dataclass_from_sections`,
    ``""`` its main one). ``nullable``: the YAML may set null ("derived from another key", e.g.
    ``critic.global_batch_size: null`` -> ``model.global_batch_size``), which ``from_cfg`` resolves."""
    metadata = {"section": section, "name": name, "nullable": nullable}
    if default_factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _key_of(f: dataclasses.Field) -> tuple[str, str, bool]:
    return f.metadata.get("section", ""), f.metadata.get("name") or f.name, bool(f.metadata.get("nullable"))


def _schema_type(annotation: Any, nullable: bool) -> Any:
    """The OmegaConf type of a field: ``X | None`` -> ``Optional[X]``; ``list[X]`` -> ``List[X]``; a union of
    several types (``int | float``) -> ``Any`` (OmegaConf 2.3 types no unions)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_optional = nullable or type(None) in typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):
        kind: Any = typing.List[args[0]] if args else typing.List[Any]
    elif origin is not None and len(args) > 1:
        return Any
    elif origin is not None:
        kind = args[0]
    else:
        kind = annotation
    return typing.Optional[kind] if is_optional else kind


def schema_fields(cls: type, sections: dict[str, str]) -> list[tuple[str, Any, Any, dataclasses.Field]]:
    """``(dotted key, OmegaConf type, default, field)`` of every field of the config dataclass ``cls`` whose
    sections map to config prefixes as ``sections`` says (``{"": "model.dpo"}``; ``{"trainer": "trainer.ppo",
    "model": "model", ...}``)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        section, name, nullable = _key_of(f)
        prefix = sections[section]
        if prefix is None:  # a section this recipe's YAML does not have (the field keeps its default)
            continue
        default = f.default_factory() if f.default_factory is not _NO_DEFAULT else f.default
        out.append((f"{prefix}.{name}" if prefix else name, _schema_type(hints[f.name], nullable), default, f))
    return out


#: recipe (reference config name) -> the config dataclasses that type it, as ``(class, sections)``.
SCHEMAS: dict[str, list[tuple[type, dict[str, str]]]] = {}


def config_schema(recipe: str, **sections: str) -> Callable[[type], type]:
    """Class decorator: the config dataclass types keys of ``conf/<recipe>.yaml``; ``sections`` maps the field
    sections of :func:`key` to dotted config prefixes (the keyword ``main`` for the ``""`` section). Stacks, for a
    dataclass that serves several recipes or several sections of one. The recipe's structured config
    (:func:`recipe_schema`) is registered in Hydra's ConfigStore as ``nemo_aligner_schema/<recipe>``."""
    mapping = {("" if k == "main" else k): v for k, v in sections.items()}

    def register(cls: type) -> type:
        SCHEMAS.setdefault(recipe, []).append((cls, mapping))
        try:
            from hydra.core.config_store import ConfigStore

            ConfigStore.instance().store(group="nemo_aligner_schema", name=recipe, node=_schema_class(recipe))
        except ImportError:  # Hydra is only needed by the entry scripts
            pass
        return cls

    return register


def _schema_class(recipe: str) -> type:
    """One nested dataclass per config section of ``recipe``, built from the fields of its config dataclasses."""
    tree: dict = {}
    for cls, sections in SCHEMAS.get(recipe, []):
        for dotted, kind, default, _ in schema_fields(cls, sections):
            node = tree
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = (kind, default)

    def build(name: str, node: dict) -> type:
        specs = []
        for k, v in node.items():
            if isinstance(v, dict):
                sub = build(f"{name}_{k}", v)
                specs.append((k, sub, dataclasses.field(default_factory=sub)))
            else:
                kind, default = v
                factory = (lambda d=default: list(d)) if isinstance(default, list) else None
                specs.append((k, kind, dataclasses.field(default_factory=factory) if factory else
                              dataclasses.field(default=default)))
        return dataclasses.make_dataclass(name, specs)

    return build(f"{recipe}_schema", tree)


def recipe_schema(recipe: str) -> DictConfig:
    """The structured config (:func:`omegaconf.OmegaConf.structured`) of the keys the config dataclasses of
    ``recipe`` type, left open (not struct) so that the keys no dataclass covers pass through to
    :func:`check_keys` and the rules of :func:`check_values`."""
    schema = OmegaConf.structured(_schema_class(recipe))

    def open_(node: DictConfig) -> None:
        OmegaConf.set_struct(node, False)  # each dataclass node carries its own struct flag
        for k in node.keys():
            if isinstance(node._get_node(k), DictConfig):
                open_(node._get_node(k))

    open_(schema)
    return schema


def schema_type_of(recipe: str, dotted: str) -> type | None:
    """The Python type (``bool``, ``int``, ``float``, ``str``) the config dataclasses of ``recipe`` give the key
    ``dotted``, or None where no dataclass covers it (or its type is not a scalar)."""
    for cls, sections in SCHEMAS.get(recipe, []):
        for key_path, kind, _, _ in schema_fields(cls, sections):
            if key_path == dotted:
                args = [a for a in typing.get_args(kind) if a is not type(None)]
                kind = args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind
                return kind if kind in (bool, int, float, str) else None
    return None


def apply_schema(cfg: DictConfig, recipe: str) -> DictConfig:
    """``cfg`` merged onto :func:`recipe_schema` ``(recipe)``: the YAML (and command-line) values fill the typed
    dataclass fields, keys the config leaves out take the fields' defaults.

    Raises:
        ConfigValueError: a value the schema's type rejects, one line naming the dotted key, the value and the type,
            e.g. ``critic.global_batch_size='abc': expected int or null (PPOConfig.critic_global_batch_size)``.
    """
    from omegaconf.errors import ValidationError

    try:
        return OmegaConf.merge(recipe_schema(recipe), cfg)
    except ValidationError as err:
        dotted = str(err.full_key or err.key)
        value = OmegaConf.select(cfg, dotted, default=None, throw_on_resolution_failure=False)
        owner = next((f"{cls.__name__}.{f.name}" for cls, sections in SCHEMAS.get(recipe, [])
                      for path, _, _, f in schema_fields(cls, sections) if path == dotted), "schema")
        kind = next((k for cls, sections in SCHEMAS.get(recipe, [])
                     for path, k, _, _ in schema_fields(cls, sections) if path == dotted), None)
        raise _fail(dotted, value, f"{_type_name(kind)} ({owner})") from None


def _type_name(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def dataclass_from_sections(cls: type, sections: dict[str, Any]) -> Any:
    """An instance of the config dataclass ``cls`` read from the config sections ``sections`` (the field sections of
    :func:`key` -> a mapping, e.g. ``{"trainer": cfg.trainer.ppo, "model": cfg.model}``). An absent key takes the
    field's default; a nullable field (:func:`key`) absent or null is None, for the caller to derive; each value is converted to the field's type
    with :func:`coerce` (``"false"`` -> False, ``2.0`` -> 2, ``2.5`` for an integer is an error).

    Raises:
        ConfigValueError: a value of the wrong type (null for a field that is not nullable), naming its dotted key.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        section, name, nullable = _key_of(f)
        mapping = sections.get(section)
        if mapping is None or name not in mapping:
            if nullable:  # absent like null: derived by the caller
                kwargs[f.name] = None
            continue
        value = mapping[name]
        if value is None:
            if not (nullable or type(None) in typing.get_args(hints[f.name])):
                raise _fail(full_key(mapping, name), value, _type_name(hints[f.name]))
            kwargs[f.name] = None
            continue
        kinds = [k for k in typing.get_args(hints[f.name]) or (hints[f.name],) if k is not type(None)]
        kinds = [typing.get_origin(k) or k for k in kinds]
        kwargs[f.name] = coerce(value, kinds[0], full_key(mapping, name)) if len(kinds) == 1 else value
    return cls(**kwargs)
