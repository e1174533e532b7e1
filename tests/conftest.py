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


@pytest.fixture(scope="session")
def separable_run(tiny_dir, tmp_path_factory):
    """A tiny expert for `sa` that saw `pe` queries as negatives: two tasks easy to tell apart."""
    from train import TrainConfig, train
    cfg = TrainConfig(task="sa", previous=["pe"], model=str(tiny_dir), out=str(tmp_path_factory.mktemp("runs") / "sa"),
                      tau=1.0, max_train=32, epochs=4, batch_size=16, micro_batch=16, lr=1e-2, max_source=96, max_target=8)
    return cfg, train(cfg)
