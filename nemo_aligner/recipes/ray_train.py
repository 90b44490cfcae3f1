"""SFT, reward model, DPO, rejection sampling and self-rewarding on Ray Train: ``trainer.ray.enable=true``.

The entry script's ``run(cfg)`` checks the config, then, when ``trainer.ray.enable`` is set and this process is not
already a Ray Train worker, hands the whole recipe to :func:`launch`::

    check_config(cfg, "gpt_dpo")
    if ray_train.wants_launch(cfg):
        return ray_train.launch(cfg, "gpt_dpo", __file__)

:func:`launch` connects to (or starts) a Ray cluster and runs a :class:`ray.train.torch.TorchTrainer` of
``trainer.ray.num_training_workers`` workers, each holding ``trainer.ray.resources_per_worker`` (Ray's logical
resources, e.g. ``{CPU: 1}`` or ``{GPU: 1, CPU: 8}``). Ray Train forms the ``torch.distributed`` process group of the
workers (gloo on CPU, NCCL on GPU) and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``NODE_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT``; every worker then runs the recipe's own ``run(cfg)``, unchanged, in which
:func:`nemo_aligner.recipes.common.setup_fabric` attaches Fabric to that group through :class:`RayTrainEnvironment`
(Fabric's DDP/FSDP strategy sees an initialised process group and uses it). So a Ray Train run is the same
computation as ``trainer.devices=N trainer.strategy=ddp`` under torchrun: the same data order per rank, the same
gradient all-reduce, the same checkpoints (``<explicit_log_dir>/checkpoints``, written by rank 0 through a temp
dir), logs and HF export in the same places. Ray Train's own run directory (its bookkeeping, no model state) is
``<explicit_log_dir>/ray_train``.

Faults: Ray Train does not restart the workers (``FailureConfig(max_failures=0)``); a user's mistake inside a
worker (:class:`~nemo_aligner.errors.UserError`) is raised again in the driver as itself, a dead worker as
:class:`RayWorkerDiedError` naming the role; rerunning the command resumes from the last checkpoint as every other
mode does (``exp_manager.resume_if_exists``).

Ray itself is the optional extra ``.[ray]`` (``ray[default]``), imported only when a run asks for it.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.errors import MissingDependencyError, UserError
from nemo_aligner.utils.config import (
    ConfigValueError,
    check_batch_sizes,
    config_schema,
    dataclass_from_sections,
    to_float,
)

INSTALL_HINT = "install it with `pip install -e .[ray]` (or `EXTRAS=dev,ray bash scripts/install.sh`)"

#: True in a process that runs the recipe as a Ray Train worker (set by :func:`_worker_loop`).
_IN_WORKER = False

#: What the driver handed the workers besides the config (:func:`run_train_workers`'s ``context``), in a worker.
_WORKER_CONTEXT: dict = {}


class RayWorkerDiedError(UserError, RuntimeError):
    """A Ray actor or Ray Train worker of the run died (killed, out of memory, its node lost); the message names the
    role and says that rerunning the command resumes from the last checkpoint."""


def require_ray(key: str) -> None:
    """Raise :class:`MissingDependencyError` naming ``key`` when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise MissingDependencyError(f"{key}=true needs Ray, which is not installed: {INSTALL_HINT}")


def parse_resources(value: Any, key: str, default: dict[str, float]) -> dict[str, float]:
    """A ``resources_per_worker`` mapping (``{CPU: 1}``, ``{GPU: 1, CPU: 4}``, custom resource names too) as
    ``{name: amount}`` with amounts >= 0 (fractions allowed: Ray's logical resources); ``None`` -> ``default``.

    Raises:
        ConfigValueError: not a mapping, an empty one, or an amount that is not a number >= 0 (naming ``key``).
    """
    if value is None:
        return dict(default)
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, dict) or not value:
        raise ConfigValueError(f"{key}={value!r}: expected a mapping of Ray resources, e.g. {{CPU: 1}} or {{GPU: 1}}")
    out = {}
    for name, amount in value.items():
        number = to_float(amount, f"{key}.{name}")
        if number < 0:
            raise ConfigValueError(f"{key}.{name}={amount!r}: expected a number >= 0")
        out[str(name)] = number
    return out


def parse_runtime_env(value: Any, key: str) -> dict | None:
    """A ``runtime_env`` block as a plain dict for Ray (``ray.init(runtime_env=...)``, an actor's
    ``.options(runtime_env=...)``): e.g. ``{env_vars: {HF_HOME: /shared/hf}}`` or ``{py_modules: [/path/to/nemo_aligner]}``
    (Ray's runtime-environment fields, checked by Ray); ``None`` or an empty mapping -> ``None`` (nothing).

    Raises:
        ConfigValueError: not a mapping, or ``env_vars`` not a mapping (naming ``key``).
    """
    if value is None:
        return None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, dict):
        raise ConfigValueError(f"{key}={value!r}: expected a mapping of Ray runtime-environment fields, e.g. "
                               "{env_vars: {NAME: value}} or {py_modules: [path]}")
    out = {str(k): v for k, v in value.items() if v is not None}
    if "env_vars" in out:
        if not isinstance(out["env_vars"], dict):
            raise ConfigValueError(f"{key}.env_vars={out['env_vars']!r}: expected a mapping NAME: value")
        out["env_vars"] = {str(k): str(v) for k, v in out["env_vars"].items()}
    return out or None


def check_worker_block(block: Any, key: str, count_field: str) -> Any:
    """Check and normalise the worker fields that ``trainer.ray`` and ``trainer.ppo.ray`` share, in place:
    ``<count_field>`` (how many workers) >= 1, ``resources_per_worker`` (:func:`parse_resources`) and
    ``runtime_env`` (:func:`parse_runtime_env`). Returns ``block``.

    Raises:
        ConfigValueError: naming ``key.<field>``.
    """
    count = getattr(block, count_field)
    if not isinstance(count, int) or count < 1:
        raise ConfigValueError(f"{key}.{count_field}={count}: expected an integer >= 1")
    if block.resources_per_worker is not None:
        block.resources_per_worker = parse_resources(block.resources_per_worker, f"{key}.resources_per_worker", {})
    block.runtime_env = parse_runtime_env(block.runtime_env, f"{key}.runtime_env")
    return block


def default_resources(accelerator: Any) -> dict[str, float]:
    """``{GPU: 1}`` per worker when the run is on GPUs (``trainer.accelerator`` gpu/cuda, or auto on a machine with
    CUDA), else ``{CPU: 1}``."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda"):
        return {"GPU": 1.0}
    if name == "auto":
        import torch

        return {"GPU": 1.0} if torch.cuda.is_available() else {"CPU": 1.0}
    return {"CPU": 1.0}


@config_schema("gpt_dpo", main="trainer.ray")
@config_schema("training_rm", main="trainer.ray")
@config_schema("gpt_sft", main="trainer.ray")
@config_schema("gpt_rs_actor", main="trainer.ray")
@config_schema("gpt_self_rewarding", main="trainer.ray")
@dataclass
class RayTrainConfig:
    """The ``trainer.ray`` block of the offline recipes (llm-on-ray's key names).

    Attributes:
        enable: run the recipe on Ray Train (false: in this process / under torchrun as before).
        num_training_workers: Ray Train workers = data-parallel ranks (replaces ``trainer.devices`` x
            ``trainer.num_nodes``, which must stay 1).
        resources_per_worker: Ray resources each worker holds (null: ``{GPU: 1}`` on GPUs, else ``{CPU: 1}``).
        address: the Ray cluster (``auto``: the one ``ray start`` runs on this machine; ``local``: always a new one;
            ``ray://host:10001``; null:
            ``$RAY_ADDRESS``, else a running local cluster, else a new one just for this run).
        runtime_env: Ray's runtime environment of the run (:func:`parse_runtime_env`; null: none), given to
            ``ray.init`` when this run connects and to every Ray Train worker (``RunConfig.worker_runtime_env``,
            so it also holds when the process was connected already), e.g. ``{env_vars: {HF_HOME: /shared/hf}}``,
            or ``{py_modules: [<checkout>/nemo_aligner]}`` to ship nemo_aligner to nodes that do not have it.

    Raises:
        ConfigValueError: ``num_training_workers < 1``, a bad resource amount or a bad ``runtime_env``.
    """

    enable: bool = False
    num_training_workers: int = 2
    resources_per_worker: dict | None = None
    address: str | None = None
    runtime_env: dict | None = None

    @classmethod
    def from_cfg(cls, section: Any, key: str = "trainer.ray") -> "RayTrainConfig":
        out = dataclass_from_sections(cls, {"": section if section is not None else {}})
        return check_worker_block(out, key, "num_training_workers")


class RayTrainEnvironment(TorchElasticEnvironment):
    """Lightning's cluster environment of a Ray Train worker: the process exists already (Ray started it) and is a
    member of the ``torch.distributed`` group Ray Train initialised; ranks, world size and the rendezvous address are
    the variables Ray Train sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``NODE_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``; the first five are torchrun's, hence the base class, which reads the node rank from torchrun's
    ``GROUP_RANK``)."""

    @staticmethod
    def detect() -> bool:
        return _IN_WORKER

    def node_rank(self) -> int:
        return int(os.environ.get("NODE_RANK", 0))

    @staticmethod
    def local_world_size() -> int:
        """Workers on this node (``LOCAL_WORLD_SIZE``)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def worker_cluster_environment() -> RayTrainEnvironment | None:
    """The :class:`RayTrainEnvironment` in a Ray Train worker of :func:`launch`, else None."""
    return RayTrainEnvironment() if _IN_WORKER else None


def in_worker() -> bool:
    """Whether this process runs the recipe as a Ray Train worker."""
    return _IN_WORKER


def worker_context() -> dict:
    """In a Ray Train worker, the ``context`` the driver gave :func:`run_train_workers` (e.g. the PPO roles' Ray
    actor handles); ``{}`` elsewhere."""
    return dict(_WORKER_CONTEXT)


def wants_launch(cfg: DictConfig) -> bool:
    """``trainer.ray.enable`` is set and this process is the driver (not yet a worker)."""
    section = OmegaConf.select(cfg, "trainer.ray")
    return bool(section is not None and section.get("enable", False)) and not _IN_WORKER


def init_ray(address: str | None, key: str, runtime_env: dict | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (see :attr:`RayTrainConfig.address`) with the job's
    ``runtime_env`` (:func:`parse_runtime_env`) unless this process already is connected (e.g. a test's local
    cluster; the callers then give ``runtime_env`` to each actor they start).

    Raises:
        MissingDependencyError: Ray is not installed.
        ConfigValueError: no Ray cluster answers at ``address`` (naming ``key``).
    """
    require_ray(key)
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address or None, runtime_env=runtime_env)
    except ConnectionError as err:
        raise ConfigValueError(f"{key}.address={address!r}: no Ray cluster answers there ({err})") from None


def ray_error_role(err: BaseException) -> str | None:
    """``"actor died"`` / ``"worker died"`` when ``err`` (or an exception it wraps) is Ray's report of a dead actor or
    worker process, else None."""
    import ray.exceptions as rex

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (rex.ActorDiedError, rex.ActorUnavailableError, rex.WorkerCrashedError,
                            rex.NodeDiedError, rex.OutOfMemoryError)):
            return type(err).__name__
        err = err.__cause__ or err.__context__
    return None


def worker_death_reason(err: BaseException) -> str | None:
    """Why a Ray Train run failed, when the cause is a dead worker process rather than an error in the recipe:
    Ray's dead-actor errors (:func:`ray_error_role`), or Ray Train's failed health check of a worker (a process
    killed by a signal or by Ray's memory monitor, reported as ``WorkerGroupError``); None otherwise. An
    out-of-memory kill says so, with what to lower."""
    text = str(err)
    if "low on memory" in text or "OutOfMemoryError" in text:
        return ("killed by Ray's memory monitor: the node ran low on memory; give each worker more memory, or run "
                "fewer or smaller processes on the node (e.g. a smaller VLLM_CPU_KVCACHE_SPACE for vLLM on CPU)")
    died = ray_error_role(err)
    if died is not None:
        return died
    if "died" in text.lower() or (type(err).__name__ == "WorkerGroupError" and "health check failed" in text):
        return type(err).__name__
    return None


def _load_script(path: str):
    """Import the entry script at ``path`` as a module (its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"nemo_aligner_ray_recipe_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _ResultSink:
    """A tiny Ray actor that carries rank 0's return value (or the first worker's :class:`UserError`) back to the
    driver (Ray Train reports metrics, not arbitrary return values)."""

    def __init__(self):
        self.result, self.error = None, None

    def set_result(self, result):
        self.result = result

    def set_error(self, error):
        if self.error is None:
            self.error = error

    def get(self):
        return self.result, self.error


def _worker_loop(config: dict) -> None:
    """The ``train_loop_per_worker`` of :func:`launch`: run the entry script's ``run(cfg)`` in this worker."""
    import ray
    import ray.train

    global _IN_WORKER, _WORKER_CONTEXT
    _IN_WORKER = True
    _WORKER_CONTEXT = dict(config["context"])
    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])  # relative paths of the config mean what they meant on the driver
    module = _load_script(config["script"])
    sink = config["sink"]
    try:
        result = module.run(config["cfg"])
    except UserError as err:
        ray.get(sink.set_error.remote(err))
        raise
    if ray.train.get_context().get_world_rank() == 0:
        ray.get(sink.set_result.remote({k: v for k, v in (result or {}).items() if k != "trainer"}))


def launch(cfg: DictConfig, schema: str, script: str | Path) -> dict:
    """Run the recipe of the entry script ``script`` (its ``run(cfg)``) on ``trainer.ray.num_training_workers`` Ray
    Train workers and return rank 0's result.

    Args:
        cfg: the recipe's config, already checked (``check_config``).
        schema: the recipe's config name (``gpt_dpo``, ``training_rm``, ``gpt_sft``, ``gpt_rs_actor``,
            ``gpt_self_rewarding``): its batch sizes are checked
            against the number of workers here, before anything starts.
        script: the entry script's file (``__file__``); each worker imports it.

    Raises:
        ConfigValueError: ``trainer.devices``/``trainer.num_nodes`` set besides Ray, a batch size that the workers
            cannot split, a bad ``trainer.ray`` value, no cluster at ``trainer.ray.address``.
        MissingDependencyError: Ray is not installed.
        UserError: whatever the recipe raised in a worker (the same exception).
        RayWorkerDiedError: a worker process died; rerunning resumes from the last checkpoint.
    """
    ray_cfg = RayTrainConfig.from_cfg(cfg.trainer.ray)
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if str(devices) != "1" or str(nodes) != "1":
        raise ConfigValueError(f"trainer.devices={devices} trainer.num_nodes={nodes} with trainer.ray.enable=true: "
                               "Ray Train places the ranks; set trainer.ray.num_training_workers instead")
    check_batch_sizes(cfg, schema, ray_cfg.num_training_workers)
    resources = ray_cfg.resources_per_worker or default_resources(cfg.trainer.get("accelerator"))
    init_ray(ray_cfg.address, "trainer.ray", ray_cfg.runtime_env)
    return run_train_workers(cfg, script, ray_cfg.num_training_workers, resources, ray_cfg.runtime_env,
                             run_name=schema, role=f"the {schema} run")


def run_train_workers(cfg: DictConfig, script: str | Path, num_workers: int, resources: dict[str, float],
                      runtime_env: dict | None, run_name: str, role: str, context: dict | None = None) -> dict:
    """Run the entry script ``script``'s ``run(cfg)`` on ``num_workers`` Ray Train workers (a
    :class:`ray.train.torch.TorchTrainer`; gloo on CPU, NCCL when ``resources`` has a GPU) of ``resources`` each and
    return rank 0's result. Ray must be connected (:func:`init_ray`).

    Args:
        run_name: the prefix of Ray Train's run name (its bookkeeping in ``<explicit_log_dir>/ray_train``).
        role: what the workers are, for the error of a dead one (e.g. ``"the gpt_dpo run"``).
        context: picklable objects (e.g. Ray actor handles) the workers read with :func:`worker_context`.

    Raises:
        UserError: whatever the recipe raised in a worker (the same exception).
        RayWorkerDiedError: a worker process died (naming ``role``); rerunning resumes from the last checkpoint.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = resources.get("GPU", 0) > 0
    log_dir = Path(str(cfg.exp_manager.explicit_log_dir)).resolve()
    sink = ray.remote(num_cpus=0)(_ResultSink).remote()
    # Ray Train v2 (Ray >= 2.50's default) starts its workers with RunConfig.worker_runtime_env; older Ray Train
    # workers get the job's runtime_env of ray.init only
    worker_env = ({"worker_runtime_env": runtime_env}
                  if runtime_env and "worker_runtime_env" in inspect.signature(RunConfig).parameters
                  else {})
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg, "script": str(Path(script).resolve()), "cwd": os.getcwd(), "sink": sink,
                           "context": dict(context or {})},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{run_name}-{uuid.uuid4().hex[:8]}", storage_path=str(log_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=0), **worker_env),
    )
    try:
        trainer.fit()
    except Exception as err:
        _, error = ray.get(sink.get.remote())
        if error is not None:
            raise error from None
        reason = worker_death_reason(err)
        if reason is not None:
            raise RayWorkerDiedError(
                f"a Ray Train worker of {role} died ({reason}); rerun the same command "
                f"to resume from the last checkpoint in {log_dir / 'checkpoints'}") from None
        raise
    finally:
        result = ray.get(sink.get.remote())[0]
        ray.kill(sink)
    return result or {}
