"""Config values: booleans and numbers given as strings parse the same way in every config object (issue 10,
item 9), and a value that is none of them is an error naming the key."""

import pytest

from nemo_aligner.algorithms.base import TrainerConfig
from nemo_aligner.algorithms.dpo import DPOLossConfig
from nemo_aligner.generation.params import SamplingParams
from nemo_aligner.utils.config import ConfigValueError, to_bool, to_float, to_int

from tests.helpers import compose_config


# ---- item 9: booleans and numbers given as strings ---------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("false", False), ("False", False), (" TRUE ", True), ("1", True), ("0", False),
    ("yes", True), ("No", False), (True, True), (False, False), (1, True), (0, False),
])
def test_to_bool_parses_strings(text, expected):
    assert to_bool(text, "a.b") is expected


@pytest.mark.parametrize("bad", ["maybe", "", "2", 2, 0.5, None, [True]])
def test_to_bool_rejects_other_values_naming_the_key(bad):
    with pytest.raises(ConfigValueError, match=r"^model\.dpo\.flag=.*expected a boolean"):
        to_bool(bad, "model.dpo.flag")


def test_to_int_and_to_float_never_truncate():
    assert to_int(2, "k") == 2 and to_int(2.0, "k") == 2 and to_int("3", "k") == 3
    assert to_float("5e-6", "k") == 5e-6 and to_float(3, "k") == 3.0
    for bad in (2.5, "2.5", True, "two", float("nan"), None):
        with pytest.raises(ConfigValueError, match="^k="):
            to_int(bad, "k")
    for bad in (True, "abc", float("inf"), None):
        with pytest.raises(ConfigValueError, match="^k="):
            to_float(bad, "k")


def test_dpo_loss_config_parses_string_booleans():
    cfg = DPOLossConfig.from_cfg({"preference_average_log_probs": "false", "sft_average_log_probs": "yes"})
    assert cfg.preference_average_log_probs is False and cfg.sft_average_log_probs is True
    assert DPOLossConfig.from_cfg({"preference_average_log_probs": "True"}).preference_average_log_probs is True
    assert DPOLossConfig.from_cfg({"ref_policy_kl_penalty": "0.25"}).ref_policy_kl_penalty == 0.25
    with pytest.raises(ConfigValueError, match=r"model\.dpo\.preference_average_log_probs='maybe'"):
        DPOLossConfig.from_cfg({"preference_average_log_probs": "maybe"})


def test_other_from_cfg_coercions_parse_the_same_way():
    from omegaconf import OmegaConf

    from nemo_aligner.algorithms.ppo import PPOConfig

    assert SamplingParams(use_greedy="false").use_greedy is False
    with pytest.raises(ConfigValueError, match="sampling_params.use_greedy"):
        SamplingParams(use_greedy="sometimes")
    ppo = compose_config("gpt_ppo_actor", ["trainer.ppo.use_absolute_kl='false'",
                                           "trainer.ppo.normalize_advantages='no'"])
    assert isinstance(ppo.trainer.ppo.use_absolute_kl, str)  # Hydra keeps a quoted value a string
    out = PPOConfig.from_cfg(ppo)
    assert out.use_absolute_kl is False and out.normalize_advantages is False
    section = OmegaConf.create({"trainer": {"dpo": {"max_epochs": 1, "max_steps": 2.5, "val_check_interval": 1,
                                                    "save_interval": 1, "limit_val_batches": 1.0,
                                                    "gradient_clip_val": 1.0}},
                                "model": {"global_batch_size": 2, "micro_batch_size": 1}})
    with pytest.raises(ConfigValueError, match=r"trainer\.dpo\.max_steps=2\.5"):
        TrainerConfig.from_cfg(section.trainer.dpo, section.model)
