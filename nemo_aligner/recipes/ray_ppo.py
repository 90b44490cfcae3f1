"""PPO on Ray (``trainer.ppo.ray.enable=true``): the critic, the reward model and the initial policy as Ray actors.

The driver (``train_gpt_ppo_actor.py``) keeps the actor (the policy trainer, one process) -- or, with
``trainer.ppo.ray.num_actor_workers=N`` > 1, runs it as N data-parallel Ray Train workers
(:meth:`RayRoles.run_actor_workers`, one ``torch.distributed`` group with Fabric DDP attached, as
:mod:`~nemo_aligner.recipes.ray_train` does for SFT/RM/DPO) that share the role actors through their pickled
handles -- and starts one Ray actor per other role, each wrapping exactly the object colocated mode builds
in-process:

==================  =======================================================================================
role                object inside the Ray actor (built by the colocated code path)
==================  =======================================================================================
``critic``          :class:`~nemo_aligner.algorithms.ppo.LocalCritic` from
                    :func:`~nemo_aligner.recipes.online.colocated_critic` (checkpoints in
                    ``<log_dir>/critic_checkpoints``, as colocated)
``reward_model``    the reward function of :func:`~nemo_aligner.recipes.online.build_reward_fn` (a local
                    :class:`~nemo_aligner.models.reward_model.RewardScorer`)
``initial_policy``  :class:`~nemo_aligner.algorithms.ppo.LocalInitialPolicy` over a never-trained copy of the
                    policy (:class:`FrozenPolicyView`; LoRA off: the base weights are the initial policy)
``rollout``         (``trainer.ppo.vllm.enable=true``) the :class:`~nemo_aligner.generation.VLLMEngine` that
                    :meth:`~nemo_aligner.models.hf_causal_lm.HFCausalLM.use_vllm` starts in colocated mode
                    (:class:`RolloutRole`)
==================  =======================================================================================

The driver talks to them through :class:`RayCritic` (a :class:`~nemo_aligner.algorithms.ppo.CriticHandle`),
:class:`RayInitialPolicy` (an ``InitialPolicyHandle``), a reward function and :class:`RayRolloutEngine` (the
policy's vLLM engine, with :class:`~nemo_aligner.generation.VLLMEngine`'s methods), so
:class:`~nemo_aligner.algorithms.ppo.PPOTrainer` runs unchanged. Rollouts travel as Ray task arguments (Ray's object
store), never through files; so do the policy's weights on each refit of the rollout engine (one ``ray.put`` of the
Hugging Face-named state dict; inside the rollout actor the engine loads them as in colocated mode).

**Placement.** All roles live in one Ray placement group (strategy ``PACK``). ``trainer.ppo.ray.colocate`` lists
groups of roles that share one bundle (e.g. ``[[critic, reward_model, initial_policy]]``); every other role gets a
bundle of its own. Each bundle holds ``trainer.ppo.ray.resources_per_worker`` (e.g. ``{CPU: 1}`` or ``{GPU: 1}``),
and each of the ``k`` roles of a bundle takes ``1/k`` of each of its resources (fractional resources, as verl and
OpenRLHF colocate models on one GPU).

**Faults.** A role whose Ray actor dies (killed, out of memory, its node lost) stops the driver with
:class:`~nemo_aligner.recipes.ray_train.RayWorkerDiedError` naming the role; the run's actors and placement group
are removed on the way out, so rerunning the same command starts fresh actors and resumes from the last checkpoint
(actor, critic and data position, as in colocated mode). A user's mistake inside a role (a missing RM export) is
raised in the driver as that same :class:`~nemo_aligner.errors.UserError`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.ppo import LocalInitialPolicy, PPOConfig, check_ppo_batch_sizes
from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.errors import UnsupportedError, UserError
from nemo_aligner.generation import GenerationOutput, LengthParams, SamplingParams, VLLMConfig, VLLMEngine, draw_row_seeds
from nemo_aligner.models.hf_backend import precision_dtype
from nemo_aligner.models.hf_causal_lm import HFCausalLM
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.recipes.online import build_reward_fn, colocated_critic
from nemo_aligner.recipes.ray_train import (
    RayWorkerDiedError,
    check_worker_block,
    default_resources,
    in_worker,
    init_ray,
    run_train_workers,
    worker_context,
)
from nemo_aligner.utils.config import ConfigValueError, config_schema, dataclass_from_sections
from nemo_aligner.utils.runtime import build_fabric, normalize_precision

#: The roles that run as Ray actors (the actor -- the policy trainer -- is the driver or its Ray Train workers);
#: ``rollout`` (the vLLM engine) only with ``trainer.ppo.vllm.enable=true``.
ROLES = ("critic", "reward_model", "initial_policy", "rollout")



def rollout_role(rank: int) -> str:
    """The rollout actor of actor rank ``rank``: ``rollout`` for rank 0 (the name ``colocate`` uses), ``rollout:<r>``
    for the other ranks of ``trainer.ppo.ray.num_actor_workers`` (each rank generates with its own engine)."""
    return "rollout" if int(rank) == 0 else f"rollout:{int(rank)}"


def _role_kind(role: str) -> str:
    """``rollout`` for every rollout replica (``rollout:1``, ...), else the role itself."""
    return role.split(":", 1)[0]


#: Seconds the rollout actor gets to stop its vLLM engine's processes before it is killed.
ENGINE_SHUTDOWN_TIMEOUT_S = 30.0

#: Seconds to wait for the placement group's bundles before giving up (the cluster lacks the resources).
PLACEMENT_TIMEOUT_S = 120.0


@config_schema("gpt_ppo_actor", main="trainer.ppo.ray")
@dataclass
class PPORayConfig:
    """The ``trainer.ppo.ray`` block.

    Attributes:
        enable: run the critic, reward model and initial policy (and, with ``trainer.ppo.vllm.enable``, the vLLM
            rollout engine) as Ray actors.
        resources_per_worker: the Ray resources of one bundle (null: ``{GPU: 1}`` on GPUs, else ``{CPU: 1}``).
        colocate: groups of roles (``critic``, ``reward_model``, ``initial_policy``, ``rollout``) that share one
            bundle.
        address: the Ray cluster (see :attr:`nemo_aligner.recipes.ray_train.RayTrainConfig.address`).
        runtime_env: Ray's runtime environment (:func:`~nemo_aligner.recipes.ray_train.parse_runtime_env`; null:
            none), given to ``ray.init`` when this run connects and to every role actor (so it also holds when the
            process was connected already), e.g. ``{env_vars: {HF_HOME: /shared/hf}}`` or
            ``{py_modules: [<checkout>/nemo_aligner]}``.
        num_actor_workers: data-parallel ranks of the actor (policy trainer). 1: the actor trains in the driver;
            N > 1: in N Ray Train workers (one ``torch.distributed`` group, Fabric DDP over it, each worker holding
            ``resources_per_worker``), which share the one critic, reward model and initial policy actor.

    Raises:
        ConfigValueError: an unknown role, a role in two groups, a bad resource amount, a bad ``runtime_env``,
            ``num_actor_workers`` < 1.
    """

    enable: bool = False
    resources_per_worker: dict | None = None
    colocate: list = field(default_factory=list)
    address: str | None = None
    runtime_env: dict | None = None
    num_actor_workers: int = 1

    @classmethod
    def from_cfg(cls, section: Any, key: str = "trainer.ppo.ray") -> "PPORayConfig":
        out = check_worker_block(dataclass_from_sections(cls, {"": section if section is not None else {}}), key,
                                 "num_actor_workers")
        groups = OmegaConf.to_container(out.colocate) if OmegaConf.is_config(out.colocate) else out.colocate
        seen: set[str] = set()
        for group in groups or []:
            if not isinstance(group, list) or not group:
                raise ConfigValueError(f"{key}.colocate={groups!r}: expected a list of role lists, e.g. "
                                       "[[critic, reward_model, initial_policy]]")
            for role in group:
                if role == "actor":
                    raise UnsupportedError(f"{key}.colocate names 'actor': the actor (policy trainer) runs in the "
                                           "driver or in its own Ray Train workers (trainer.ppo.ray.num_actor_workers); "
                                           "colocate critic, reward_model, initial_policy and rollout")
                if role not in ROLES:
                    raise ConfigValueError(f"{key}.colocate: unknown role {role!r}; roles are {list(ROLES)}")
                if role in seen:
                    raise ConfigValueError(f"{key}.colocate: role {role!r} is in two groups")
                seen.add(role)
        out.colocate = [list(g) for g in groups or []]
        return out

    def groups(self, roles: list[str]) -> list[list[str]]:
        """The bundles' role groups for the roles this run has: the ``colocate`` groups (restricted to ``roles``),
        then one group per remaining role, in :data:`ROLES` order (the rollout replicas of actor ranks > 0,
        ``rollout:<r>``, after ``rollout``)."""
        out = [[r for r in g if r in roles] for g in self.colocate]
        out = [g for g in out if g]
        placed = {r for g in out for r in g}
        rest = sorted((r for r in roles if r not in placed),
                      key=lambda r: (ROLES.index(_role_kind(r)), int(r.split(":")[1]) if ":" in r else 0))
        return out + [[r] for r in rest]


# ---------------------------------------------------------------------------------------------------------------
# inside the Ray actors
# ---------------------------------------------------------------------------------------------------------------
class FrozenPolicyView:
    """A policy model that is never trained, seen as its own reference policy: ``get_logprobs(batch,
    reference=True)`` is the model's own log-probabilities. In the initial-policy Ray actor the policy is loaded
    from ``pretrained_checkpoint`` and only ever run in inference, so it *is* the initial policy, and
    :class:`~nemo_aligner.algorithms.ppo.LocalInitialPolicy` works on it unchanged (without the second, frozen copy
    that a trainable policy keeps)."""

    def __init__(self, model):
        self.model = model
        self.pad_token_id = model.pad_token_id

    def inference(self):
        return self.model.inference()

    def get_logprobs(self, batch, reference: bool = False, return_entropy: bool = False):
        return self.model.get_logprobs(batch, return_entropy=return_entropy)


def _role_fabric(cfg: DictConfig):
    """A one-process Fabric for a role (``trainer.accelerator`` / ``precision`` of the run, seeded with
    ``model.seed`` as the driver is)."""
    trainer = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    trainer.devices, trainer.num_nodes, trainer.strategy = 1, 1, "auto"
    return build_fabric(trainer, seed=int(cfg.model.seed))


class _RewardModelRole:
    """The reward function of colocated mode (:func:`~nemo_aligner.recipes.online.build_reward_fn` of
    ``reward_model.restore_from_path``)."""

    def __init__(self, cfg: DictConfig, fabric):
        self.reward_fn, self.max_seq_length, desc = build_reward_fn(
            cfg.reward_model.get("restore_from_path"), fabric.device, int(cfg.reward_model.micro_batch_size),
            remote_key="remote_critic_rm.enable")
        self.description = f"{desc} (Ray actor)"

    def score(self, prompt_ids, response_ids) -> list[float]:
        return self.reward_fn(prompt_ids, response_ids)

    def info(self) -> tuple[int | None, str]:
        return self.max_seq_length, self.description


class RolloutRole:
    """The rollout engine of colocated mode in its own Ray actor: the :class:`~nemo_aligner.generation.VLLMEngine`
    that :meth:`~nemo_aligner.models.hf_causal_lm.HFCausalLM.use_vllm` would start for the policy
    (``pretrained_checkpoint.restore_from_path``'s architecture, ``trainer.ppo.vllm``; ``dtype: auto`` = the dtype
    ``trainer.precision`` loads the policy in; seeded with ``model.seed`` as the driver's engine is).

    Raises:
        MissingDependencyError: vLLM is not installed where the actor runs.
        ConfigValueError: a bad ``trainer.ppo.vllm`` value.
    """

    def __init__(self, cfg: DictConfig):
        vllm_cfg = VLLMConfig.from_cfg(cfg.trainer.ppo.get("vllm"), "trainer.ppo.vllm")
        dtype = vllm_cfg.dtype
        if dtype == "auto":
            dtype = str(precision_dtype(normalize_precision(cfg.trainer.precision))).replace("torch.", "")
        self.engine = VLLMEngine(resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path)), vllm_cfg,
                                 dtype=dtype, seed=int(torch.initial_seed() % (1 << 31)))

    def info(self) -> tuple[float, int]:
        """``(engine start-up seconds, max_model_len)``."""
        return self.engine.start_seconds, self.engine.max_model_len

    def refit(self, state_dict: dict[str, torch.Tensor]) -> int:
        """Load ``state_dict`` (Hugging Face names, as :meth:`HFCausalLM.rollout_weights` yields them) into the
        engine (:meth:`VLLMEngine.refit`); returns the engine's refit count."""
        self.engine.refit(state_dict.items())
        return self.engine.refits

    def generate(self, prompt_ids, sampling_params, length_params, eos_token_ids, seeds=None) -> GenerationOutput:
        return self.engine.generate(prompt_ids, sampling_params, length_params, eos_token_ids, seeds=seeds)

    def num_refits(self) -> int:
        """How many refits the engine has loaded."""
        return self.engine.refits

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def shutdown(self) -> None:
        self.engine.shutdown()


def build_role(role: str, cfg: DictConfig, max_steps: int | None, log_dir: str) -> Any:
    """The object a role's Ray actor holds (see the module docstring), built with the colocated code path."""
    fabric = _role_fabric(cfg)
    precision = normalize_precision(cfg.trainer.precision)
    ppo_cfg = PPOConfig.from_cfg(cfg)
    if role == "critic":
        return colocated_critic(cfg, fabric, ppo_cfg, int(max_steps), precision, Path(log_dir))[0]
    if role == "initial_policy":
        model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
        model_cfg.peft.peft_scheme = "none"  # LoRA's reference is the base model: load just that
        policy = HFCausalLM(fabric, model_cfg, str(cfg.pretrained_checkpoint.restore_from_path), max_steps=1,
                            need_reference=False, precision=precision)
        return LocalInitialPolicy(FrozenPolicyView(policy), ppo_cfg.forward_micro_batch_size)
    if role == "reward_model":
        return _RewardModelRole(cfg, fabric)
    if _role_kind(role) == "rollout":
        return RolloutRole(cfg)
    raise ValueError(f"unknown role {role!r}")


class RoleActor:
    """The body of every role's Ray actor: builds the role's object (:func:`build_role`) and runs its methods.

    A failure while building is kept and raised by :meth:`ready` (and every later call), so that a user's mistake
    (a missing export) reaches the driver as a task error carrying the original exception rather than as a dead
    actor."""

    def __init__(self, role: str, cfg: DictConfig, max_steps: int | None, log_dir: str, cwd: str):
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths of the config mean what they mean on the driver
        self.role, self.obj, self.error = role, None, None
        try:
            self.obj = build_role(role, cfg, max_steps, log_dir)
        except Exception as err:  # noqa: BLE001 (re-raised by every call)
            self.error = err

    def ready(self) -> bool:
        if self.error is not None:
            raise self.error
        return True

    def call(self, method: str, *args, **kwargs):
        self.ready()
        return getattr(self.obj, method)(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()

    def placement(self) -> tuple[str | None, dict]:
        """``(placement group id, resources Ray assigned to this actor)`` (e.g. ``{"CPU": 0.5}``)."""
        import ray

        context = ray.get_runtime_context()
        return context.get_placement_group_id(), context.get_assigned_resources()


# ---------------------------------------------------------------------------------------------------------------
# in the driver
# ---------------------------------------------------------------------------------------------------------------
class RoleHandle:
    """A role's Ray actor seen from the driver: :meth:`call` runs a method and waits for it.

    Raises (from :meth:`call`):
        RayWorkerDiedError: the actor is dead, naming the role.
        UserError: the role raised one (the same exception).
    """

    def __init__(self, role: str, actor, roles: "RayRoles | None" = None):
        self.role, self.actor, self.roles = role, actor, roles  # roles: the run's RayRoles

    def call(self, method: str, *args, **kwargs):
        return self.wait(getattr(self.actor, method).remote(*args, **kwargs))

    def wait(self, ref):
        import ray
        import ray.exceptions as rex

        try:
            return ray.get(ref)
        except rex.RayTaskError as err:
            cause = err.cause  # the exception the role raised (RayTaskError keeps it)
            if isinstance(cause, UserError):
                raise cause from None
            raise
        except (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RayWorkerDiedError(
                f"the Ray actor of the PPO {self.role} died ({type(err).__name__}: {reason[:200]}); rerun the same "
                "command to resume from the last checkpoint") from None


class RayCritic:
    """:class:`~nemo_aligner.algorithms.ppo.CriticHandle` of the critic's Ray actor: one critic for the run
    (``shared``: the trainer sends it every rank's rollouts, as to a critic server)."""

    shared = True

    def __init__(self, handle: RoleHandle):
        self.handle = handle

    def infer(self, rollouts: Rollouts) -> torch.Tensor:
        return self.handle.call("call", "infer", rollouts)

    def train(self, rollouts: Rollouts, seed: int, step: int) -> dict[str, float]:
        return self.handle.call("call", "train", rollouts, seed, step)

    def save(self, step: int) -> None:
        self.handle.call("call", "save", step)

    def load(self, step: int) -> None:
        self.handle.call("call", "load", step)

    def reset(self) -> None:
        self.handle.call("call", "reset")

    def prune(self, keep_steps: set[int]) -> None:
        self.handle.call("call", "prune", set(keep_steps))


class RayInitialPolicy:
    """``InitialPolicyHandle`` of the initial policy's Ray actor."""

    def __init__(self, handle: RoleHandle):
        self.handle = handle

    def logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        return self.handle.call("call", "logprobs", rollouts)


class RayRolloutEngine:
    """The rollout actor's vLLM engine seen from the driver, with the interface
    :meth:`~nemo_aligner.models.hf_causal_lm.HFCausalLM.use_vllm` takes (that of
    :class:`~nemo_aligner.generation.VLLMEngine`): the policy refits it when its weights changed and sends it every
    ``generate``, exactly as it does an engine in its own process.

    Attributes:
        cfg: the :class:`~nemo_aligner.generation.VLLMConfig` of ``trainer.ppo.vllm``.
        start_seconds, max_model_len: the engine's start-up time (s) and longest prompt + response (tokens).
        holder: which weights the engine holds (set by the policy, see ``HFCausalLM._sync_engine``).
        refits: how many refits the engine has loaded.

    Raises (from every method): as :meth:`RoleHandle.call` (a dead rollout actor: ``RayWorkerDiedError`` naming it).
    """

    def __init__(self, handle: RoleHandle, cfg: VLLMConfig):
        self.handle, self.cfg = handle, cfg
        self.start_seconds, self.max_model_len = handle.call("call", "info")
        self.holder = None
        self.refits = 0

    def refit(self, weights) -> float:
        """Send ``weights`` (``(name, tensor)`` pairs) to the engine through Ray's object store (one ``ray.put`` of
        the CPU state dict, handed to the actor as a task argument) and load them there. Returns the seconds it
        took in all (copy to CPU, put, transfer, the engine's own refit)."""
        import ray

        start = time.perf_counter()
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights}
        ref = ray.put(state)
        del state
        self.refits = self.handle.call("call", "refit", ref)
        del ref
        return time.perf_counter() - start

    def generate(self, prompt_ids: list[list[int]], sampling_params: SamplingParams, length_params: LengthParams,
                 eos_token_ids: list[int], seeds: list[int] | None = None,
                 generator: torch.Generator | None = None) -> GenerationOutput:
        """:meth:`VLLMEngine.generate` in the rollout actor; the row seeds are drawn here from ``generator``
        (:func:`~nemo_aligner.generation.draw_row_seeds`, as the engine would), so the responses are the same as an
        engine in this process gives."""
        rows = draw_row_seeds(len(prompt_ids), seeds, generator)
        return self.handle.call("call", "generate", prompt_ids, sampling_params, length_params, list(eos_token_ids),
                                seeds=None if all(s is None for s in rows) else rows)

    def sleep(self) -> None:
        self.handle.call("call", "sleep")

    def wake_up(self) -> None:
        self.handle.call("call", "wake_up")


class RayRoles:
    """The Ray side of one PPO run: its placement group and its role actors (see the module docstring).

    Use :meth:`start`, then :meth:`spawn` each role (``spawn`` returns at once; the role loads in the background),
    :meth:`handle` to wait for one, and :meth:`shutdown` (always: ``with RayRoles.start(...) as roles``).
    """

    def __init__(self, cfg: DictConfig, ray_cfg: PPORayConfig, roles: list[str], log_dir: Path):
        import ray
        from ray.util.placement_group import placement_group

        self.cfg, self.ray_cfg, self.log_dir = cfg, ray_cfg, Path(log_dir).resolve()
        self.resources = ray_cfg.resources_per_worker or default_resources(cfg.trainer.get("accelerator"))
        self.groups = ray_cfg.groups(roles)
        self.bundle_of = {role: i for i, group in enumerate(self.groups) for role in group}
        self.handles: dict[str, RoleHandle] = {}
        self.placement_group = None
        total = ray.cluster_resources()
        workers = ray_cfg.num_actor_workers if ray_cfg.num_actor_workers > 1 else 0  # Ray Train's own bundles
        count = len(self.groups) + workers
        short = {k: v * count for k, v in self.resources.items() if v * count > total.get(k, 0.0)}
        if short:  # fail now, not after the placement timeout
            also = f" and {workers} actor worker(s)" if workers else ""
            raise ConfigValueError(
                f"trainer.ppo.ray: {len(self.groups)} bundle(s) of {self.resources} (groups {self.groups}){also} "
                f"need {short}, "
                f"more than the whole Ray cluster has ({ {k: total.get(k, 0.0) for k in short} }); lower "
                "trainer.ppo.ray.resources_per_worker or colocate roles (trainer.ppo.ray.colocate)")
        self.placement_group = placement_group([dict(self.resources) for _ in self.groups], strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self.shutdown()
            raise ConfigValueError(
                f"trainer.ppo.ray: the Ray cluster cannot place {len(self.groups)} bundle(s) of {self.resources} "
                f"(groups {self.groups}) within {PLACEMENT_TIMEOUT_S:.0f} s; cluster resources: "
                f"{ray.cluster_resources()}; lower trainer.ppo.ray.resources_per_worker or colocate roles")

    @classmethod
    def start(cls, cfg: DictConfig, with_reward_model: bool, log_dir: Path) -> "RayRoles":
        """Connect to Ray (``trainer.ppo.ray.address``) and reserve the placement group of this run's roles
        (``reward_model`` only ``with_reward_model``: a programmatic reward needs none).

        Raises:
            MissingDependencyError: Ray is not installed.
            UnsupportedError: ``trainer.devices``/``num_nodes`` > 1 (Ray places the actor's ranks:
                ``trainer.ppo.ray.num_actor_workers``), or vLLM rollouts with more than one actor worker.
            ConfigValueError: a bad ``trainer.ppo.ray`` value, batch sizes the actor workers cannot split, or the
                cluster cannot place the bundles.
        """
        ray_cfg = PPORayConfig.from_cfg(cfg.trainer.ppo.ray)
        if str(cfg.trainer.get("devices", 1)) != "1" or str(cfg.trainer.get("num_nodes", 1)) != "1":
            raise UnsupportedError("trainer.ppo.ray.enable=true places the actor (policy trainer) itself: "
                                   "set trainer.devices=1 trainer.num_nodes=1, and trainer.ppo.ray.num_actor_workers "
                                   "for its data-parallel ranks")
        if bool(cfg.remote_critic_rm.enable):
            raise UnsupportedError("trainer.ppo.ray.enable=true and remote_critic_rm.enable=true: choose one")
        vllm_cfg = VLLMConfig.from_cfg(cfg.trainer.ppo.get("vllm"), "trainer.ppo.vllm")
        workers = ray_cfg.num_actor_workers
        if workers > 1:
            if vllm_cfg.enable and any("rollout" in group for group in ray_cfg.colocate or []):
                raise UnsupportedError(
                    f"trainer.ppo.ray.num_actor_workers={workers} with trainer.ppo.vllm.enable=true starts one "
                    "rollout engine per actor rank, each in a bundle of its own: remove rollout from "
                    "trainer.ppo.ray.colocate")
            check_ppo_batch_sizes(PPOConfig.from_cfg(cfg), workers, RayCritic.shared)
        init_ray(ray_cfg.address, "trainer.ppo.ray", ray_cfg.runtime_env)
        roles = [r for r in ROLES if r not in ("reward_model", "rollout")
                 or (r == "reward_model" and with_reward_model)]
        if vllm_cfg.enable:  # one vLLM engine per actor rank
            roles += [rollout_role(rank) for rank in range(workers)]
        return cls(cfg, ray_cfg, roles, log_dir)

    def __enter__(self) -> "RayRoles":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def spawn(self, role: str, max_steps: int | None = None) -> None:
        """Start ``role``'s Ray actor in its bundle, with ``1/k`` of the bundle's resources (``k`` roles share it);
        nothing when it has been started already (in an actor worker, the driver started every role)."""
        import ray

        if role in self.handles:
            return
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        share = 1.0 / len(self.groups[self.bundle_of[role]])
        amounts = {k: v * share for k, v in self.resources.items()}
        options = dict(
            num_cpus=amounts.pop("CPU", 0.0), num_gpus=amounts.pop("GPU", 0.0), resources=amounts or None,
            name=None, max_restarts=0, max_task_retries=0, runtime_env=self.ray_cfg.runtime_env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=self.bundle_of[role]),
        )
        actor = ray.remote(RoleActor).options(**options).remote(role, self.cfg, max_steps, str(self.log_dir),
                                                                os.getcwd())
        self.handles[role] = RoleHandle(role, actor, self)

    def handle(self, role: str) -> RoleHandle:
        """``role``'s handle once its actor has built the role object.

        Raises:
            UserError: the role could not be built (e.g. MissingFileError for a missing export).
            RayWorkerDiedError: its actor died.
        """
        handle = self.handles[role]
        handle.call("ready")
        return handle

    @property
    def roles(self) -> list[str]:
        """The roles of this run (each in one bundle of :attr:`groups`)."""
        return [role for group in self.groups for role in group]

    def rollout_engine(self, rank: int = 0) -> RayRolloutEngine:
        """Actor rank ``rank``'s rollout engine (:func:`rollout_role`), once it has started (for
        ``HFCausalLM.use_vllm(..., engine=)``).

        Raises:
            UserError: the engine could not start (e.g. MissingDependencyError: no vLLM where the actor runs).
            RayWorkerDiedError: its actor died.
        """
        return RayRolloutEngine(self.handle(rollout_role(rank)), VLLMConfig.from_cfg(self.cfg.trainer.ppo.get("vllm"),
                                                                            "trainer.ppo.vllm"))

    def reward_source(self) -> tuple[Callable, int | None, str]:
        """``(reward_fn, max_seq_length, description)`` of the reward model's actor (as
        :func:`~nemo_aligner.recipes.online.build_reward_fn` returns in colocated mode)."""
        handle = self.handle("reward_model")
        max_len, desc = handle.call("call", "info")

        def reward_fn(prompt_ids, response_ids):
            return handle.call("call", "score", prompt_ids, response_ids)

        return reward_fn, max_len, desc

    @property
    def num_actor_workers(self) -> int:
        """The actor's data-parallel ranks (``trainer.ppo.ray.num_actor_workers``)."""
        return self.ray_cfg.num_actor_workers

    def run_actor_workers(self, cfg: DictConfig, script: str | Path, reward_fn: Callable | None = None) -> dict:
        """Run the actor as :attr:`num_actor_workers` Ray Train workers (each ``resources_per_worker``, one
        ``torch.distributed`` group with Fabric attached, as
        :func:`~nemo_aligner.recipes.ray_train.run_train_workers` does for SFT/RM/DPO): each runs the entry script
        ``script``'s ``run(cfg)``, which finds this object (the role actors' handles, all spawned already: see
        :meth:`spawn`) and ``reward_fn`` through :func:`actor_worker_context`. Returns rank 0's result.

        Raises:
            UserError: what a worker raised (e.g. RayWorkerDiedError naming a dead role actor).
            RayWorkerDiedError: an actor worker died (naming the PPO actor).
        """
        return run_train_workers(cfg, script, self.num_actor_workers, self.resources, self.ray_cfg.runtime_env,
                                 run_name="gpt_ppo_actor", role="the PPO actor",
                                 context={"ppo_roles": self, "reward_fn": reward_fn})

    def shutdown(self) -> None:
        """Kill the role actors and remove the placement group (idempotent)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        rollouts = [h for role, h in self.handles.items() if _role_kind(role) == "rollout"]
        if rollouts:  # let vLLM stop its engine-core processes (a killed actor would leave them behind)
            try:
                ray.wait([h.actor.call.remote("shutdown") for h in rollouts], num_returns=len(rollouts),
                         timeout=ENGINE_SHUTDOWN_TIMEOUT_S)
            except Exception:  # noqa: BLE001 (already dead)
                pass
        for handle in self.handles.values():
            try:
                ray.kill(handle.actor, no_restart=True)
            except Exception:  # noqa: BLE001 (already dead)
                pass
        self.handles = {}
        if self.placement_group is not None:
            try:
                remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001 (already removed)
                pass
            self.placement_group = None


def actor_worker_context() -> tuple["RayRoles", Callable | None] | None:
    """In an actor worker of :meth:`RayRoles.run_actor_workers`: ``(the driver's RayRoles, its programmatic
    reward_fn or None)``; None in any other process."""
    context = worker_context()
    if not in_worker() or "ppo_roles" not in context:
        return None
    return context["ppo_roles"], context["reward_fn"]
