import pytest
import torch

from checkpoint import load_dir, make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The `tiny` checkpoint (random Llama + sentencepiece trained on SuperNI), written once per run."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture()
def tiny(tiny_dir):
    torch.manual_seed(0)
    return load_dir(tiny_dir)
