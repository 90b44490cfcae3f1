"""Config checks of the DPO/SFT/RM recipes: a bad value and an unwritable log dir are clean one-line errors naming
the key, raised before any data or model loads (issue 10, items 19, 20). How a single value is parsed (item 9) is
tests/unit/utils/test_config_values.py."""

import subprocess
import sys
import time

import pytest

from nemo_aligner.recipes import common as recipe
from nemo_aligner.recipes.common import run_or_exit
from nemo_aligner.utils.config import ConfigValueError

from tests.helpers import REPO, compose_config, load_example_script


# ---- item 19: bad values through the real entry scripts, before any load -----------------------------------------

SCRIPTS = {"gpt_dpo": "train_gpt_dpo", "gpt_sft": "train_gpt_sft", "training_rm": "train_reward_model"}


def _cfg(schema, tmp_path, model_dir, *overrides):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Hi", "chosen": " a", "rejected": " b"}\n')
    base = [f"pretrained_checkpoint.restore_from_path={model_dir}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
            f"model.data.cache_dir={tmp_path / 'cache'}", "trainer.accelerator=cpu"]
    if schema == "gpt_sft":
        base += [f"model.data.train_ds.file_path={data}", "model.data.validation_ds.file_path=null"]
    else:
        base += [f"model.data.data_prefix.train=[{data}]", "model.data.data_prefix.validation=null"]
    return compose_config(schema, base + list(overrides))


def _forbid_loads(monkeypatch, script, allow_fabric=False):
    """Make every step after the config check fail loudly, so a test proves the error came first."""

    def loaded(*args, **kwargs):
        raise AssertionError("the recipe went past the config check")

    names = ["load_split", "HFCausalLM", "HFRewardModel", "load_pretrained"]
    if not allow_fabric:
        names += ["setup_fabric", "checkpoint_manager"]
    for name in names:
        if hasattr(script, name) and not (allow_fabric and name == "load_pretrained"):
            monkeypatch.setattr(script, name, loaded)


def _run_expecting_exit(script, cfg, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(script.run, cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


BAD_VALUES = [
    ("gpt_dpo", "model.micro_batch_size=0", "model.micro_batch_size=0: expected an integer >= 1"),
    ("gpt_dpo", "model.optim.betas=[0.9]", "model.optim.betas=[0.9]: expected a list of 2 numbers in [0, 1)"),
    ("gpt_dpo", "model.micro_batch_size=2.5", "model.micro_batch_size=2.5: expected an integer >= 1"),
    ("gpt_dpo", "pretrained_checkpoint.restore_from_path=null", "pretrained_checkpoint.restore_from_path=null"),
    ("gpt_dpo", "model.dpo.preference_average_log_probs=maybe", "model.dpo.preference_average_log_probs='maybe'"),
    ("gpt_dpo", "model.optim.lr=0", "model.optim.lr=0: expected a number > 0"),
    ("gpt_sft", "model.data.train_ds.micro_batch_size=0", "model.data.train_ds.micro_batch_size=0"),
    ("gpt_sft", "model.data.train_ds.micro_batch_size=2.5", "model.data.train_ds.micro_batch_size=2.5"),
    ("gpt_sft", "model.optim.betas=[0.9]", "model.optim.betas=[0.9]"),
    ("gpt_sft", "pretrained_checkpoint.restore_from_path=null", "pretrained_checkpoint.restore_from_path=null"),
    ("training_rm", "model.micro_batch_size=0", "model.micro_batch_size=0"),
    ("training_rm", "model.optim.betas=[0.9]", "model.optim.betas=[0.9]"),
    ("training_rm", "model.micro_batch_size=2.5", "model.micro_batch_size=2.5"),
    ("training_rm", "pretrained_checkpoint.restore_from_path=null", "pretrained_checkpoint.restore_from_path=null"),
    ("training_rm", "model.reward_standardization.std=0", "model.reward_standardization.std=0"),
    # issue 25: a negative limit or step count was read as "all" / "no limit"; an unknown attention implementation
    # was transformers' traceback
    ("gpt_dpo", "trainer.dpo.limit_val_batches=-1",
     "trainer.dpo.limit_val_batches=-1: expected a batch count >= 0 (an integer) or a fraction >= 0 (1.0: all batches)"),
    ("gpt_dpo", "trainer.dpo.limit_val_batches=-0.5", "trainer.dpo.limit_val_batches=-0.5: expected a number >= 0"),
    ("gpt_sft", "trainer.sft.limit_val_batches=-1", "trainer.sft.limit_val_batches=-1: expected a batch count >= 0"),
    ("training_rm", "trainer.rm.limit_val_batches=-2", "trainer.rm.limit_val_batches=-2: expected a batch count >= 0"),
    ("gpt_dpo", "trainer.dpo.max_steps=-5", "trainer.dpo.max_steps=-5: expected an integer >= 1 or -1"),
    ("gpt_sft", "trainer.sft.max_steps=-5", "trainer.sft.max_steps=-5: expected an integer >= 1 or -1"),
    ("training_rm", "trainer.rm.max_steps=-2", "trainer.rm.max_steps=-2: expected an integer >= 1 or -1"),
    ("gpt_dpo", "model.attn_implementation=bogus",
     "model.attn_implementation='bogus': expected one of sdpa, eager, flash_attention_2, flash_attention_3, flex_attention"),
    ("gpt_sft", "model.attn_implementation=flash_attn", "model.attn_implementation='flash_attn': expected one of sdpa"),
]


@pytest.mark.parametrize("schema, override, message", BAD_VALUES, ids=[f"{s}:{o}" for s, o, _ in BAD_VALUES])
def test_bad_value_is_a_one_line_error_before_any_load(schema, override, message, tmp_path, tiny_model_dir,
                                                       capsys, monkeypatch):
    script = load_example_script(SCRIPTS[schema])
    _forbid_loads(monkeypatch, script)
    line = _run_expecting_exit(script, _cfg(schema, tmp_path, tiny_model_dir, override), capsys)
    assert message in line


@pytest.mark.parametrize("schema, override, message", [
    ("gpt_ppo_actor", "trainer.ppo.max_steps=-5", "trainer.ppo.max_steps=-5: expected an integer >= 1 or -1"),
    ("gpt_rs_actor", "trainer.rs.max_steps=-2", "trainer.rs.max_steps=-2: expected an integer >= 1 or -1"),
    ("gpt_self_rewarding", "trainer.self_rewarding.max_steps=-3", "trainer.self_rewarding.max_steps=-3: expected an "
                                                                   "integer >= 1 or -1"),
    ("gpt_self_rewarding", "trainer.self_rewarding.limit_val_batches=-1",
     "trainer.self_rewarding.limit_val_batches=-1: expected a batch count >= 0"),
    ("gpt_self_rewarding", "trainer.self_rewarding.limit_train_batches=-1",
     "trainer.self_rewarding.limit_train_batches=-1: expected a batch count >= 0"),
    ("gpt_ppo_actor", "model.attn_implementation=bogus", "model.attn_implementation='bogus': expected one of sdpa"),
])
def test_negative_sentinels_and_attention_are_checked_in_every_trainer(schema, override, message):
    """The online trainers' configs (PPO, RS, self-rewarding) go through the same rules as DPO/SFT/RM."""
    from nemo_aligner.recipes.common import check_config

    cfg = compose_config(schema, ["pretrained_checkpoint.restore_from_path=/tmp/model", override])
    with pytest.raises(ConfigValueError) as err:
        check_config(cfg, schema)
    assert message in str(err.value)


@pytest.mark.parametrize("schema, override", [("gpt_dpo", "trainer.dpo.max_steps=-1"),
                                              ("gpt_dpo", "trainer.dpo.limit_val_batches=0"),
                                              ("gpt_dpo", "trainer.dpo.limit_val_batches=0.5"),
                                              ("gpt_sft", "trainer.sft.limit_val_batches=3"),
                                              ("gpt_dpo", "model.attn_implementation=eager"),
                                              ("gpt_dpo", "model.attn_implementation=flex_attention")])
def test_the_sentinels_and_attention_implementations_still_accepted(schema, override, tmp_path, tiny_model_dir):
    from nemo_aligner.recipes.common import check_config

    check_config(_cfg(schema, tmp_path, tiny_model_dir, override), schema)


MISSING_PACKAGES = [
    ("trainer.accelerator=tpu", "torch_xla", "error: trainer.accelerator=tpu needs torch_xla, which is not installed: "
     "`pip install torch_xla` on a TPU machine, or set trainer.accelerator=auto (GPU if visible, else CPU)"),
    ("exp_manager.create_wandb_logger=true", "wandb", "error: exp_manager.create_wandb_logger=true needs wandb, which "
     "is not installed: `pip install wandb`, or set exp_manager.create_wandb_logger=false"),
]


@pytest.mark.parametrize("schema", list(SCRIPTS))
@pytest.mark.parametrize("override, package, message", MISSING_PACKAGES, ids=[p for _, p, _ in MISSING_PACKAGES])
def test_a_setting_whose_package_is_missing_is_one_line_before_any_load(schema, override, package, message, tmp_path,
                                                                       tiny_model_dir, capsys, monkeypatch):
    """Used to be lightning's ``ModuleNotFoundError: Requirement 'torch_xla>=1.13' not met`` (or wandb's) traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    script = load_example_script(SCRIPTS[schema])
    _forbid_loads(monkeypatch, script)
    assert _run_expecting_exit(script, _cfg(schema, tmp_path, tiny_model_dir, override), capsys) == message


def test_sft_batch_size_error_names_sfts_own_keys(tmp_path, tiny_model_dir, capsys, monkeypatch):
    script = load_example_script("train_gpt_sft")
    _forbid_loads(monkeypatch, script)
    cfg = _cfg("gpt_sft", tmp_path, tiny_model_dir,
               "model.data.train_ds.global_batch_size=3", "model.data.train_ds.micro_batch_size=2")
    line = _run_expecting_exit(script, cfg, capsys)
    assert "model.data.train_ds.global_batch_size=3 must be a multiple of model.data.train_ds.micro_batch_size=2" in line
    assert "model.global_batch_size" not in line


@pytest.mark.parametrize("schema", list(SCRIPTS))
def test_empty_model_directory_is_named_before_the_data_load(schema, tmp_path, capsys, monkeypatch):
    script = load_example_script(SCRIPTS[schema])
    _forbid_loads(monkeypatch, script, allow_fabric=True)
    empty = tmp_path / "empty_model"
    empty.mkdir()
    line = _run_expecting_exit(script, _cfg(schema, tmp_path, empty), capsys)
    assert f"restore_from_path='{empty}' is not a model checkpoint directory (it is empty)" in line
    assert "sentencepiece" not in line


@pytest.mark.parametrize("schema", list(SCRIPTS))
def test_zero_byte_weights_are_named_before_the_data_load(schema, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Was ``SafetensorError: Error while deserializing header: header too small`` from transformers."""
    import shutil

    script = load_example_script(SCRIPTS[schema])
    _forbid_loads(monkeypatch, script, allow_fabric=True)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"")
    line = _run_expecting_exit(script, _cfg(schema, tmp_path, model), capsys)
    assert line == (f"error: model weights file {model / 'model.safetensors'} is empty or damaged (0 bytes); copy or "
                    "download the checkpoint again")


def test_null_model_path_never_becomes_the_hub_id_none():
    from nemo_aligner.models.pretrained import resolve_pretrained

    for value in (None, "None", "null", " "):
        with pytest.raises(ConfigValueError, match="restore_from_path.*is not set"):
            resolve_pretrained(value)


def test_string_booleans_are_normalised_for_the_recipe(tmp_path, tiny_model_dir):
    from nemo_aligner.recipes.common import check_config

    cfg = _cfg("gpt_dpo", tmp_path, tiny_model_dir, "model.dpo.shared_prefix='false'", "model.micro_batch_size=1.0")
    check_config(cfg, "gpt_dpo")
    assert cfg.model.dpo.shared_prefix is False and type(cfg.model.micro_batch_size) is int


def test_cli_bad_value_exits_2_fast_without_traceback(tmp_path, tiny_model_dir):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "nlp" / "gpt" / "train_gpt_dpo.py"),
         f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
         "model.micro_batch_size=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: model.micro_batch_size=0: expected an integer >= 1"
    assert not (tmp_path / "run").exists()  # failed before even the log dir
    assert time.monotonic() - start < 120


# ---- item 20: the log dir is checked first ------------------------------------------------------------------------


@pytest.mark.parametrize("schema", list(SCRIPTS))
def test_log_dir_under_a_file_fails_before_any_load(schema, tmp_path, tiny_model_dir, capsys, monkeypatch):
    script = load_example_script(SCRIPTS[schema])
    _forbid_loads(monkeypatch, script)
    monkeypatch.setattr(script, "checkpoint_manager", recipe.checkpoint_manager)  # the real one: it checks the dir
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory\n")
    log_dir = blocker / "logs"
    cfg = _cfg(schema, tmp_path, tiny_model_dir, f"exp_manager.explicit_log_dir={log_dir}")
    line = _run_expecting_exit(script, cfg, capsys)
    assert f"exp_manager.explicit_log_dir='{log_dir}' is not a writable directory (NotADirectoryError" in line


def test_unwritable_log_dir_fails_before_any_load(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A directory that exists but refuses writes (chmod 0500 does not stop root, so the refusal is simulated)."""
    import tempfile

    script = load_example_script("train_gpt_dpo")
    _forbid_loads(monkeypatch, script)
    monkeypatch.setattr(script, "checkpoint_manager", recipe.checkpoint_manager)
    log_dir = tmp_path / "readonly"
    log_dir.mkdir()
    real = tempfile.NamedTemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(log_dir):
            raise PermissionError(13, "Permission denied", str(log_dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    line = _run_expecting_exit(script, _cfg("gpt_dpo", tmp_path, tiny_model_dir,
                                            f"exp_manager.explicit_log_dir={log_dir}"), capsys)
    assert line == (f"error: exp_manager.explicit_log_dir='{log_dir}' is not a writable directory "
                    "(PermissionError: Permission denied)")


def test_sft_batch_sizes_are_checked_again_against_the_real_world_size(tmp_path, tiny_model_dir, monkeypatch):
    """``trainer.devices=auto``: the data-parallel size is known only once Fabric starts; the error still names
    SFT's keys and comes before any load."""
    from types import SimpleNamespace

    from nemo_aligner.recipes.common import check_config

    cfg = _cfg("gpt_sft", tmp_path, tiny_model_dir, "trainer.devices=auto",
               "model.data.train_ds.global_batch_size=2", "model.data.train_ds.micro_batch_size=2")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_config(cfg, "gpt_sft")  # one rank as far as the config says
    monkeypatch.setattr(recipe, "build_fabric", lambda *a, **k: SimpleNamespace(world_size=2))
    monkeypatch.setattr(recipe, "build_loggers", lambda *a, **k: [])
    with pytest.raises(ConfigValueError, match=r"^model\.data\.train_ds\.global_batch_size=2 must be a multiple of "
                                               r"model\.data\.train_ds\.micro_batch_size=2 x data-parallel size 2$"):
        recipe.setup_fabric(cfg, tmp_path / "run", "gpt_sft")


# ---- issue 25 items 1 and 2: the inference servers' values, before any model loads ----------------------------------

SERVERS = {"inference_rm": "serve_reward_model", "inference_initial_policy": "serve_initial_policy",
           "gpt_ppo_critic": "serve_ppo_critic"}

SERVER_BAD_VALUES = [
    ("inference_rm", "inference.micro_batch_size=0", "inference.micro_batch_size=0: expected an integer >= 1"),
    ("inference_rm", "inference.max_items_per_request=0",
     "inference.max_items_per_request=0: expected an integer >= 1"),
    ("inference_rm", "inference.max_wait_ms=-5", "inference.max_wait_ms=-5: expected a number >= 0"),
    ("inference_rm", "inference.port=70000", "inference.port=70000: expected an integer >= 0 and <= 65535"),
    ("inference_initial_policy", "inference.micro_batch_size=0",
     "inference.micro_batch_size=0: expected an integer >= 1"),
    ("inference_initial_policy", "inference.max_wait_ms=-5", "inference.max_wait_ms=-5: expected a number >= 0"),
    ("inference_initial_policy", "inference.port=70000", "inference.port=70000: expected an integer >= 0 and <= 65535"),
    ("gpt_ppo_critic", "model.forward_micro_batch_size=0", "model.forward_micro_batch_size=0: expected an integer >= 1"),
    ("gpt_ppo_critic", "model.micro_batch_size=0", "model.micro_batch_size=0: expected an integer >= 1"),
    ("gpt_ppo_critic", "trainer.ppo.max_queue_delay_microseconds=-5",
     "trainer.ppo.max_queue_delay_microseconds=-5: expected a number >= 0"),
    ("gpt_ppo_critic", "trainer.ppo.port=70000", "trainer.ppo.port=70000: expected an integer >= 0 and <= 65535"),
]


def _forbid_server_loads(monkeypatch, script):
    """Every model load of the three servers, and listening, fail loudly: the error must come first."""
    from nemo_aligner.models.reward_model import RewardScorer
    from nemo_aligner.servers.initial_policy_server import InitialPolicyScorer

    def loaded(*args, **kwargs):
        raise AssertionError("the server went past the config check")

    monkeypatch.setattr(RewardScorer, "from_pretrained", loaded)
    monkeypatch.setattr(InitialPolicyScorer, "from_pretrained", loaded)
    for name in ("build_fabric", "run_server"):
        if hasattr(script, name):
            monkeypatch.setattr(script, name, loaded)


def _serve_expecting_exit(schema, overrides, tmp_path, capsys, monkeypatch):
    script = load_example_script(SERVERS[schema])
    _forbid_server_loads(monkeypatch, script)
    base = {"inference_rm": [f"rm_model_file={tmp_path}"],
            "gpt_ppo_critic": [f"exp_manager.explicit_log_dir={tmp_path / 'critic'}"]}.get(schema, [])
    cfg = compose_config(schema, ["trainer.accelerator=cpu", *base, *overrides])
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(script.serve, cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("schema, override, message", SERVER_BAD_VALUES,
                         ids=[f"{s}:{o}" for s, o, _ in SERVER_BAD_VALUES])
def test_server_bad_value_is_a_one_line_error_before_any_load(schema, override, message, tmp_path, capsys,
                                                              monkeypatch):
    line = _serve_expecting_exit(schema, [override], tmp_path, capsys, monkeypatch)
    assert line == f"error: {message}"


@pytest.mark.parametrize("token", ["' '", "''", "'\t'"], ids=["space", "empty", "tab"])
@pytest.mark.parametrize("schema, key", [("inference_rm", "inference.api_token"),
                                         ("inference_initial_policy", "inference.api_token"),
                                         ("gpt_ppo_critic", "trainer.ppo.api_token")])
def test_server_blank_api_token_is_refused_before_any_load(schema, key, token, tmp_path, capsys, monkeypatch):
    """Before, a blank token fell back to $NEMO_ALIGNER_API_TOKEN or no auth, and the server started."""
    monkeypatch.delenv("NEMO_ALIGNER_API_TOKEN", raising=False)
    line = _serve_expecting_exit(schema, [f"{key}={token}"], tmp_path, capsys, monkeypatch)
    assert line.startswith(f"error: {key}=")
    assert "expected a non-empty token, or null" in line and "cannot be sent as a bearer token" in line
