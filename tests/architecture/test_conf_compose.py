"""Issue 11, one source of truth per config key: every ``conf/*.yaml`` composes with Hydra and fills the structured
config of its recipe's dataclasses (types from the dataclass fields, values from the YAML), each algorithm's config
object builds from it, the dataclass defaults agree with the YAML, and the conf directory ships in the wheel."""

import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from nemo_aligner.algorithms.base import TrainerConfig
from nemo_aligner.algorithms.dpo import DPOLossConfig
from nemo_aligner.algorithms.ppo import PPOConfig
from nemo_aligner.algorithms.rs import RSConfig
from nemo_aligner.algorithms.self_rewarding import SelfRewardingConfig
from nemo_aligner.generation.params import LengthParams, SamplingParams
from nemo_aligner.utils.config import (
    SCHEMAS,
    ConfigValueError,
    apply_schema,
    check_keys,
    load_schema,
    schema_fields,
)

from tests.helpers import REPO, compose_config

ALL_CONFS = sorted(p.stem for p in (REPO / "conf").glob("*.yaml"))


#: recipe -> the config objects its entry script builds, from the composed config.
BUILDERS = {
    "gpt_dpo": lambda c: [DPOLossConfig.from_cfg(c.model.dpo), TrainerConfig.from_cfg(c.trainer.dpo, c.model)],
    "gpt_sft": lambda c: [TrainerConfig.from_cfg(c.trainer.sft, c.model.data.train_ds)],
    "training_rm": lambda c: [TrainerConfig.from_cfg(c.trainer.rm, c.model)],
    "gpt_ppo_actor": lambda c: [PPOConfig.from_cfg(c), SamplingParams.from_cfg(c.model.ppo.sampling_params),
                                LengthParams.from_cfg(c.model.ppo.length_params)],
    "gpt_rs_actor": lambda c: [RSConfig.from_cfg(c), SamplingParams.from_cfg(c.model.rs.sampling_params),
                               LengthParams.from_cfg(c.model.rs.length_params)],
    "gpt_self_rewarding": lambda c: [SelfRewardingConfig.from_cfg(c), SamplingParams.from_cfg(c.model.spin.sampling_params),
                                     LengthParams.from_cfg(c.model.spin.length_params)],
    "generation": lambda c: [SamplingParams.from_cfg(c.generation.sampling_params),
                             LengthParams.from_cfg(c.generation.length_params)],
}


def test_every_conf_file_is_covered():
    assert ALL_CONFS == sorted(["generation", "gpt_dpo", "gpt_ppo_actor", "gpt_ppo_critic", "gpt_rs_actor", "gpt_self_rewarding",
                                "gpt_sft", "inference_initial_policy", "inference_rm", "training_rm"])
    assert set(BUILDERS) == set(SCHEMAS), "every recipe with config dataclasses has a builder here"


@pytest.mark.parametrize("name", ALL_CONFS)
def test_every_conf_composes_with_its_schema(name):
    cfg = compose_config(name)
    check_keys(cfg, load_schema(name), source=f"{name} config")
    typed = apply_schema(cfg, name)  # the YAML fills the structured config of the recipe's dataclasses
    assert set(typed.keys()) == set(cfg.keys())  # the schema adds no section the YAML lacks
    for obj in BUILDERS.get(name, lambda c: [])(cfg):
        for f in dataclasses.fields(obj):
            assert getattr(obj, f.name) is not None, (name, type(obj).__name__, f.name)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_schema_keys_exist_in_the_yaml_with_the_fields_type(name):
    """Every key a dataclass types is a key of the shipped YAML, and the YAML's value has the field's type."""
    cfg = OmegaConf.to_container(compose_config(name), resolve=True)
    cfg = OmegaConf.create(cfg)
    for cls, sections in SCHEMAS[name]:
        for dotted, kind, _, f in schema_fields(cls, sections):
            assert OmegaConf.select(cfg, dotted, default="<absent>") != "<absent>", f"{name}: {dotted} not in the YAML"
    typed = apply_schema(cfg, name)
    assert OmegaConf.to_container(typed, resolve=True) == OmegaConf.to_container(cfg, resolve=True)


#: The defaults of dataclasses shared by several recipes are the Python API's neutral values; these YAML values
#: are recipe-specific and win (the YAML is what users ran with).
RECIPE_VALUES = {
    ("gpt_ppo_actor", "model.ppo.length_params.max_length"): 64,
    ("gpt_ppo_actor", "model.ppo.length_params.min_length"): 1,
    ("gpt_rs_actor", "model.rs.length_params.max_length"): 64,
    ("gpt_rs_actor", "model.rs.length_params.min_length"): 1,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_dataclass_defaults_are_the_yaml_values(name):
    """No drift: a dataclass default equals the shipped YAML's value (e.g. DPOLossConfig's beta was 0.2 while
    conf/gpt_dpo.yaml said 0.1), except a nullable key the YAML leaves null (derived) and :data:`RECIPE_VALUES`."""
    raw = compose_config(name)
    cfg = OmegaConf.create(OmegaConf.to_container(raw, resolve=True))
    drift = []
    for cls, sections in SCHEMAS[name]:
        for dotted, _, default, f in schema_fields(cls, sections):
            value = OmegaConf.select(cfg, dotted)
            value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
            if value is None and f.metadata.get("nullable"):
                continue
            parent, leaf = dotted.rsplit(".", 1)
            if default is None and OmegaConf.is_interpolation(OmegaConf.select(raw, parent), leaf):
                continue  # None = "follows another key", which the YAML says with an interpolation
            if (name, dotted) in RECIPE_VALUES:
                assert value == RECIPE_VALUES[name, dotted] != default
                continue
            if value != default or type(value) is bool != type(default) is bool:
                drift.append(f"{cls.__name__}.{f.name}={default!r} but {name}.yaml {dotted}={value!r}")
    assert not drift, drift


def test_dpo_beta_default_is_the_yaml_value():
    assert DPOLossConfig().ref_policy_kl_penalty == 0.1 == compose_config("gpt_dpo").model.dpo.ref_policy_kl_penalty
    assert DPOLossConfig.from_cfg({}).ref_policy_kl_penalty == 0.1


def test_schemas_are_registered_as_hydra_structured_configs():
    repo = ConfigStore.instance().repo["nemo_aligner_schema"]
    assert {f"{n}.yaml" for n in SCHEMAS} <= set(repo)
    node = repo["gpt_dpo.yaml"].node
    assert OmegaConf.get_type(node.model, "dpo").__name__ == "gpt_dpo_schema_model_dpo"
    assert node.model.dpo.ref_policy_kl_penalty == 0.1


@pytest.mark.parametrize("name, override, message", [
    ("gpt_ppo_actor", "critic.global_batch_size=abc",
     "critic.global_batch_size='abc': expected an integer or null (PPOConfig.critic_global_batch_size)"),
    ("gpt_rs_actor", "model.rs.forward_micro_batch_size=abc",
     "model.rs.forward_micro_batch_size='abc': expected an integer or null (RSConfig.forward_micro_batch_size)"),
    ("gpt_ppo_actor", "model.ppo.length_params.max_length=[1]",
     "model.ppo.length_params.max_length=[1]: expected an integer (LengthParams.max_length)"),
])
def test_type_errors_come_from_the_schema_naming_the_key(name, override, message):
    cfg = compose_config(name, [override])
    with pytest.raises(ConfigValueError) as err:
        apply_schema(cfg, name)
    assert str(err.value) == message


def test_check_config_types_null_default_keys_from_the_schema():
    """``model.rs.forward_micro_batch_size`` is null in the YAML, so its type is only known from RSConfig: a bad value
    is a ConfigValueError naming the key before anything loads (check_values let it through, and RSConfig.from_cfg
    then failed with a bare ``int('abc')`` ValueError)."""
    from nemo_aligner.utils.config import check_values

    cfg = compose_config("gpt_rs_actor", ["model.rs.forward_micro_batch_size=abc"])
    with pytest.raises(ConfigValueError, match=r"^model\.rs\.forward_micro_batch_size='abc': expected an integer"):
        check_values(cfg, load_schema("gpt_rs_actor"), "gpt_rs_actor")
    cfg = compose_config("gpt_rs_actor", ["model.rs.forward_micro_batch_size=4.0"])
    check_values(cfg, load_schema("gpt_rs_actor"), "gpt_rs_actor")
    assert cfg.model.rs.forward_micro_batch_size == 4 and type(cfg.model.rs.forward_micro_batch_size) is int
    assert RSConfig.from_cfg(cfg).forward_micro_batch_size == 4


def test_unknown_key_is_still_an_error_naming_it():
    from nemo_aligner.utils.config import ConfigKeyError

    cfg = compose_config("gpt_dpo", ["+model.dpo.ref_policy_kl_penaltyy=0.3"])
    with pytest.raises(ConfigKeyError, match=r"model\.dpo\.ref_policy_kl_penaltyy.*did you mean 'model\.dpo\.ref_policy_kl_penalty'"):
        check_keys(cfg, load_schema("gpt_dpo"), source="gpt_dpo config")


def test_conf_ships_in_the_wheel_and_is_found_outside_the_repo(tmp_path):
    """``pip wheel .`` puts conf/*.yaml in the wheel as nemo_aligner/conf/, and an installed copy (``--target``, the
    repository not on sys.path, run from elsewhere) finds them with load_schema and CONF_DIR."""
    wheels, site, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    src.mkdir()
    for part in ("setup.py", "MANIFEST.in", "README.md"):  # a copy of the tree: setuptools builds in-tree
        shutil.copy(REPO / part, src / part)
    for part in ("conf", "nemo_aligner"):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, cwd=tmp_path, capture_output=True, timeout=600)
    wheel = next(wheels.glob("nemo_aligner-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"nemo_aligner/conf/{n}.yaml" for n in ALL_CONFS} <= names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import sys, nemo_aligner.utils.config as c; "
            "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "assert str(c.CONF_DIR).startswith(sys.argv[1]), c.CONF_DIR; "
            "print(c.load_schema('gpt_dpo').model.dpo.ref_policy_kl_penalty, c.CONF_DIR)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    value, conf_dir = out.stdout.split()
    assert value == "0.1" and Path(conf_dir) == site / "nemo_aligner" / "conf"
