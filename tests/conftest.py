"""Shared fixtures: a tiny tokenizer and tiny causal LMs built offline from a config (random weights), and a SmolLM2
reward-model export for the slow tests. The code they run lives in ``tests/helpers/``, which tests import directly;
nothing imports this file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, SHARED_DATA, build_tiny_model, build_tokenizer


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the tests marked long (deselected by default; see pytest.ini)")


def pytest_collection_modifyitems(config, items):
    """Deselect the tests marked ``long`` unless ``--long`` is given (they still count as deselected in pytest's
    summary line, so a run says how many it left out)."""
    if config.getoption("--long"):
        return
    long = [item for item in items if item.get_closest_marker("long") is not None]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if item.get_closest_marker("long") is None]


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models run fastest on one intra-op thread (thread start-up costs more than the matmuls), and CI has
    two cores shared by the test process and the servers it starts. Tests marked ``slow`` (real SmolLM2) keep
    torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Directory with a saved tiny Llama and the tiny tokenizer (loadable by from_pretrained)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _stop_vllm_engines():
    """Stop the session's vLLM engines before pytest closes its output (vLLM's own exit hook would log to it)."""
    yield
    module = sys.modules.get("nemo_aligner.generation.vllm_engine")
    if module is not None:
        module.shutdown_engines()


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with ``head_dim`` 64 (what vLLM's CPU backend needs) and the tiny tokenizer. Every vLLM test uses
    this one architecture with :data:`tests.helpers.VLLM_TEST_OVERRIDES`, so the session starts one engine
    (``VLLMEngine.shared``) and each test refits it with its own weights."""
    path = tmp_path_factory.mktemp("tiny_llama_hd64")
    build_tiny_model("llama-hd64", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    build_tiny_model("gpt2", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_rm_export(tmp_path_factory) -> Path:
    """A SmolLM2-135M-Instruct reward-model export: the RM quick start's ``results/rm_quickstart/hf_export`` when it
    exists, else one trained here (2 steps of 2 HH-RLHF pairs, 128 tokens; ~1 min on CPU) so the slow tests never
    skip on a fresh machine. Skips only when the HH-RLHF data is missing."""
    import subprocess

    export = REPO / "results" / "rm_quickstart" / "hf_export"
    if (export / "config.json").is_file():
        return export
    if not (SHARED_DATA / "train.jsonl.gz").is_file():
        pytest.skip(f"no HH-RLHF data at {SHARED_DATA}")
    log_dir = tmp_path_factory.mktemp("smollm2_rm")
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "nlp" / "gpt" / "train_reward_model.py"),
         "pretrained_checkpoint.restore_from_path=smollm2-135m-instruct",
         f"model.data.data_prefix.train=[{SHARED_DATA / 'train.jsonl.gz'}]", "model.data.data_prefix.validation=null",
         f"model.data.cache_dir={log_dir / 'cache'}", f"exp_manager.explicit_log_dir={log_dir}",
         "trainer.accelerator=cpu", "trainer.rm.max_steps=2", "trainer.rm.val_check_interval=0",
         "trainer.rm.save_interval=0", "model.global_batch_size=2", "model.micro_batch_size=2",
         "model.encoder_seq_length=128", "model.data.truncation=drop"],
        check=True, capture_output=True, text=True,
    )
    export = log_dir / "hf_export"
    assert (export / "config.json").is_file()
    return export


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster per test module (tests marked ``ray``): 4 logical CPUs, no dashboard, on loopback only,
    its session files in a fresh short temp dir (Ray's socket paths are length-limited); shut down at the end of
    the module. Not per session: ``ray.shutdown()`` at the end of a session that has also run vLLM engines hung
    in ``disconnect`` (seen in a full .ci/run), while a shutdown before any vLLM engine starts returns at once.
    Workers inherit this process's environment (``PYTHONPATH``: the checkout's ``nemo_aligner``)."""
    import shutil
    import tempfile

    ray = pytest.importorskip("ray")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
             log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
