"""Strict CPU test setup: 8 emulated devices, full-precision matmuls, tiny random HF models."""

import os

# LLVM's optimisation level 0 for the CPU code XLA emits: the suite is mostly compilation of
# tiny programs, which this makes ~25 % faster (the HLO passes, and so the programs, FLOP
# counts and collectives the tests check, are unchanged). Child processes get it too.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Fixed tolerances (float32): per layer, and on a whole model's outputs.
ATOL_LAYER = 1e-5
ATOL_MODEL = 1e-4


def pytest_configure(config):
    assert jax.device_count() == 8, "tests need 8 emulated CPU devices (XLA_FLAGS was set late)"


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Factory for tiny random HF checkpoints saved with `save_pretrained` (cached per name)."""
    from tests import tiny

    cache = {}

    def get(name: str):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            cache[name] = tiny.build(name, directory)
        return cache[name]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def tfds_dir(tmp_path_factory):
    """TFDS prepares the local builders once per session, away from ~/tensorflow_datasets."""
    path = tmp_path_factory.mktemp("tfds")
    os.environ["TFDS_DATA_DIR"] = str(path)
    return path
