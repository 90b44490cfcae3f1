"""PPO on Ray (``trainer.ppo.ray.enable=true``): the critic, the reward model and the initial policy as Ray actors.

The driver (``train_gpt_ppo_actor.py``) keeps the actor (the policy trainer, one process) and starts one Ray actor
per other role, each wrapping exactly the object colocated mode builds in-process:

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
==================  =======================================================================================

The driver talks to them through :class:`RayCritic` (a :class:`~nemo_aligner.algorithms.ppo.CriticHandle`),
:class:`RayInitialPolicy` (an ``InitialPolicyHandle``) and a reward function, so
:class:`~nemo_aligner.algorithms.ppo.PPOTrainer` runs unchanged. Rollouts travel as Ray task arguments (Ray's object
store), never through files.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.ppo import LocalInitialPolicy, PPOConfig
from nemo_aligner.data.rollouts import Rollouts
from nemo_aligner.errors import UnsupportedError, UserError
from nemo_aligner.models.hf_causal_lm import HFCausalLM
from nemo_aligner.recipes.online import build_reward_fn, colocated_critic
from nemo_aligner.recipes.ray_train import RayWorkerDiedError, default_resources, init_ray, parse_resources
from nemo_aligner.utils.config import ConfigValueError, config_schema, dataclass_from_sections
from nemo_aligner.utils.runtime import build_fabric, normalize_precision

#: The roles that run as Ray actors (the actor -- the policy trainer -- stays in the driver).
ROLES = ("critic", "reward_model", "initial_policy")

#: Seconds to wait for the placement group's bundles before giving up (the cluster lacks the resources).
PLACEMENT_TIMEOUT_S = 120.0


@config_schema("gpt_ppo_actor", main="trainer.ppo.ray")
@dataclass
class PPORayConfig:
    """The ``trainer.ppo.ray`` block.

    Attributes:
        enable: run the critic, reward model and initial policy as Ray actors.
        resources_per_worker: the Ray resources of one bundle (null: ``{GPU: 1}`` on GPUs, else ``{CPU: 1}``).
        colocate: groups of roles (``critic``, ``reward_model``, ``initial_policy``) that share one bundle.
        address: the Ray cluster (see :attr:`nemo_aligner.recipes.ray_train.RayTrainConfig.address`).

    Raises:
        ConfigValueError: an unknown role, a role in two groups, a bad resource amount.
    """

    enable: bool = False
    resources_per_worker: dict | None = None
    colocate: list = field(default_factory=list)
    address: str | None = None

    @classmethod
    def from_cfg(cls, section: Any, key: str = "trainer.ppo.ray") -> "PPORayConfig":
        out = dataclass_from_sections(cls, {"": section if section is not None else {}})
        if out.resources_per_worker is not None:
            out.resources_per_worker = parse_resources(out.resources_per_worker, f"{key}.resources_per_worker", {})
        groups = OmegaConf.to_container(out.colocate) if OmegaConf.is_config(out.colocate) else out.colocate
        seen: set[str] = set()
        for group in groups or []:
            if not isinstance(group, list) or not group:
                raise ConfigValueError(f"{key}.colocate={groups!r}: expected a list of role lists, e.g. "
                                       "[[critic, reward_model, initial_policy]]")
            for role in group:
                if role == "actor":
                    raise UnsupportedError(f"{key}.colocate names 'actor': the actor (policy trainer) runs in the "
                                           "driver; colocate critic, reward_model and initial_policy")
                if role not in ROLES:
                    raise ConfigValueError(f"{key}.colocate: unknown role {role!r}; roles are {list(ROLES)}")
                if role in seen:
                    raise ConfigValueError(f"{key}.colocate: role {role!r} is in two groups")
                seen.add(role)
        out.colocate = [list(g) for g in groups or []]
        return out

    def groups(self, roles: list[str]) -> list[list[str]]:
        """The bundles' role groups for the roles this run has: the ``colocate`` groups (restricted to ``roles``),
        then one group per remaining role, in :data:`ROLES` order."""
        out = [[r for r in g if r in roles] for g in self.colocate]
        out = [g for g in out if g]
        placed = {r for g in out for r in g}
        return out + [[r] for r in ROLES if r in roles and r not in placed]


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
        short = {k: v * len(self.groups) for k, v in self.resources.items() if v * len(self.groups) > total.get(k, 0.0)}
        if short:  # fail now, not after the placement timeout
            raise ConfigValueError(
                f"trainer.ppo.ray: {len(self.groups)} bundle(s) of {self.resources} (groups {self.groups}) need {short}, "
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
            UnsupportedError: ``trainer.devices``/``num_nodes`` > 1 (the actor runs in the one driver process).
            ConfigValueError: a bad ``trainer.ppo.ray`` value, or the cluster cannot place the bundles.
        """
        ray_cfg = PPORayConfig.from_cfg(cfg.trainer.ppo.ray)
        if str(cfg.trainer.get("devices", 1)) != "1" or str(cfg.trainer.get("num_nodes", 1)) != "1":
            raise UnsupportedError("trainer.ppo.ray.enable=true runs the actor (policy trainer) in the driver process: "
                                   "set trainer.devices=1 trainer.num_nodes=1")
        if bool(cfg.remote_critic_rm.enable):
            raise UnsupportedError("trainer.ppo.ray.enable=true and remote_critic_rm.enable=true: choose one")
        init_ray(ray_cfg.address, "trainer.ppo.ray")
        roles = [r for r in ROLES if with_reward_model or r != "reward_model"]
        return cls(cfg, ray_cfg, roles, log_dir)

    def __enter__(self) -> "RayRoles":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def spawn(self, role: str, max_steps: int | None = None) -> None:
        """Start ``role``'s Ray actor in its bundle, with ``1/k`` of the bundle's resources (``k`` roles share it)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        share = 1.0 / len(self.groups[self.bundle_of[role]])
        amounts = {k: v * share for k, v in self.resources.items()}
        options = dict(
            num_cpus=amounts.pop("CPU", 0.0), num_gpus=amounts.pop("GPU", 0.0), resources=amounts or None,
            name=None, max_restarts=0, max_task_retries=0,
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

    def reward_source(self) -> tuple[Callable, int | None, str]:
        """``(reward_fn, max_seq_length, description)`` of the reward model's actor (as
        :func:`~nemo_aligner.recipes.online.build_reward_fn` returns in colocated mode)."""
        handle = self.handle("reward_model")
        max_len, desc = handle.call("call", "info")

        def reward_fn(prompt_ids, response_ids):
            return handle.call("call", "score", prompt_ids, response_ids)

        return reward_fn, max_len, desc

    def shutdown(self) -> None:
        """Kill the role actors and remove the placement group (idempotent)."""
        import ray
        from ray.util.placement_group import remove_placement_group

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
