import json
import os
import random
import re

import numpy
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
from checkpoint import load_dir, make_tiny

# hubs are unreachable here: fail at once, not after retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def cpu_without_native_bf16():
    """The default dtype follows the host (bf16 on CPUs with native bf16), and the machines the tests
    run on differ: every test and fixture runs as on a CPU without it, so none depends on the
    machine. Tests of the bf16 path ask for dtype="bfloat16"; test_train's dtype tests set the
    detection both ways. Child processes (train.py, evaluate.py run as commands) are not reached:
    the tests that start them pass --dtype."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "native_bf16", lambda: False)
        yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                         reason="needs a CUDA GPU (the GPU tier: -m cuda)")])])
def device(request, monkeypatch):
    """Each test that takes it runs on the CPU and, where there is one, on the GPU. train.py and
    evaluate.py take the GPU whenever there is one, so the cpu case hides it from them."""
    if request.param == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The `tiny` checkpoint (random Llama + sentencepiece trained on SuperNI), written
    once per run."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture()
def tiny(tiny_dir):
    torch.manual_seed(0)
    return load_dir(tiny_dir)


@pytest.fixture(scope="session")
def separable_run(tiny_dir, tmp_path_factory):
    """A tiny expert for `sa` that saw `pe` queries as negatives: two tasks easy to tell apart."""
    from train import TrainConfig, train
    cfg = TrainConfig(task="sa", previous=["pe"], model=str(tiny_dir),
                      out=str(tmp_path_factory.mktemp("runs") / "sa"),
                      tau=1.0, max_train=32, epochs=4, batch_size=16, micro_batch=16, lr=1e-2,
                      max_source=96, max_target=8)
    return cfg, train(cfg)


# three synthetic SuperNI task files, told apart by their definitions, each with one fixed answer
SYNTHETIC = {"colour": ("Name the colour of the object in the sentence.", "red"),
             "count": ("Count the number of people mentioned in the story.", "three"),
             "mood": ("Decide whether the review below is positive or negative.", "positive")}


@pytest.fixture(scope="session")
def synthetic_tasks(tmp_path_factory):
    """Paths of the three task files (100 eval + 40 train instances each), in sequence order."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    words = "the a house river city dog small old new with under over near".split()
    for name, (definition, answer) in SYNTHETIC.items():
        instances = [dict(id=f"{name}-{i}", input=" ".join(rng.choices(words, k=8)),
                          output=[answer]) for i in range(140)]
        (root / f"{name}.json").write_text(json.dumps(dict(Definition=[definition],
                                                           Instances=instances)))
    return [str(root / f"{name}.json") for name in SYNTHETIC]


@pytest.fixture(scope="session")
def eval_queries():
    """queries(tok, tasks, n=10): the first n eval prompts of each task (96 source tokens), and
    each one's task."""
    from pathlib import Path

    from data import load_task
    from experts import prompt_ids

    def queries(tok, tasks, n=10):
        prompts, gold = [], []
        for t in tasks:
            prompts += [prompt_ids(tok, ex.query, 96) for ex in load_task(t, "eval")[:n]]
            gold += [Path(t).stem] * n
        return prompts, gold
    return queries


@pytest.fixture(scope="session")
def check_stage_parameters():
    """check(run, params, extra): a MoSEs/SETA run's parameters per stage (evaluate.py)
    against its files."""
    from experts import TRAINING_FILE

    def stored(run, i):
        """Stage i's files, read with safetensors and numpy alone: masks unpacked by numpy."""
        d = next(run.glob(f"{i}-*")) / "expert"
        state, training = load_file(d / "subexperts.safetensors"), load_file(d / TRAINING_FILE)

        def bits(prefix):
            return sum(int(numpy.unpackbits(v.numpy()).sum()) for k,
                       v in state.items() if re.search(prefix, k))
        return dict(held=bits(r"\.(A|B|router)\.used$"),
                    mask=bits(rf"\.masks\.{d.parent.name.split('-', 1)[1]}\."),
                    weights=sum(v.numel() for k, v in {**state, **training}.items()
                                if re.search(r"\.(A|B|router)(\.free)?$", k)
                                and ".masks." not in k),
                    free=sum(v.numel() for k, v in training.items() if k.endswith(".free")),
                    bytes=(d / "subexperts.safetensors").stat().st_size,
                    training_bytes=(d / TRAINING_FILE).stat().st_size)

    def check_stage_parameters(run, params, extra):
        """evaluate's parameters per stage against the stored files: what a stage trains is the free
        weights the stage before left (all, at stage 1), a score per weight, and `extra`; held, mask
        and trainable share from the bits numpy unpacks; bytes from the files' sizes."""
        files = [stored(run, i) for i in (1, 2, 3)]
        free_before = [files[0]["weights"], files[0]["free"], files[1]["free"]]
        for i, (p, f) in enumerate(zip(params, files)):
            assert p["trainable"] == free_before[i] + f["weights"] + extra(i), i
            assert (p["held"], p["mask"], p["bytes"],
                    p["training_bytes"]) == (f["held"], f["mask"], f["bytes"], f["training_bytes"])
            assert p["trainable_share"] == pytest.approx(
                (f["held"] - (files[i - 1]["held"] if i else 0)) / f["mask"])
            assert p["lora_bytes"] == (i + 1) * params[0]["lora_bytes"]
    return check_stage_parameters
