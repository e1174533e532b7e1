"""MoSEs: per-task masks over sparse sub-experts, earlier tasks frozen, prompt keys pick the task."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lora
from checkpoint import load_dir
from data import load_task
from evaluate import evaluate_run
from experts import Expert, prompt_ids
from router import match_keys, query_features
from train import TrainConfig, train_sequence


def layer(sparsity=0.3, seed=0):
    torch.manual_seed(seed)
    return lora.SubExpertLinear(torch.nn.Linear(16, 12), lora.LoraConfig(r=4, dropout=0.0),
                                lora.SubExpertConfig(experts=2, top_k=2, sparsity=sparsity))


@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.5])
def test_a_tasks_mask_keeps_the_top_share_of_each_weight_tensor(sparsity):
    m = layer(sparsity)
    m.finish_task("a")
    for k in lora.MASKED:
        mask, scores = m.masks["a"][k], m.scores[k].detach().abs()
        assert mask.sum() == round(sparsity * mask.numel())
        assert scores[mask].min() >= scores[~mask].max(), "the kept weights are the best scored"


def test_weights_an_earlier_mask_holds_never_move(device):
    m = layer().to(device)
    m.finish_task("a")
    before = {k: getattr(m, k).detach().clone() for k in lora.MASKED}
    m.learning = True
    # as train.py builds it: fused on CUDA
    opt = torch.optim.AdamW(lora.subexpert_parameters(m), lr=0.1, weight_decay=0.0, fused=device == "cuda")
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 16, device=device)).square().sum().backward()
        opt.step()
    for k in lora.MASKED:
        held, now = m.masks["a"][k], getattr(m, k).detach()
        assert torch.equal(now[held], before[k][held]), k
    assert not torch.equal(m.B, before["B"]), "the free weights do learn"


def test_held_weights_stay_put_through_the_training_loop_even_as_their_masks_scores_move(moses_runs):
    first, second = stage(moses_runs[0.1], 1), stage(moses_runs[0.1], 2)
    for key, held in first.adapter.items():
        if ".used_" in key:
            weight = key.replace(".used_", ".")
            assert torch.equal(first.adapter[weight][held], second.adapter[weight][held]), weight
    assert any(not torch.equal(v, second.adapter[k]) for k, v in first.adapter.items() if ".scores." in k)


def test_without_a_task_the_layer_is_the_base_layer():
    m = layer()
    x = torch.randn(3, 16)
    assert torch.equal(m(x), m.base(x))


@pytest.fixture(scope="module")
def moses_runs(tiny_dir, synthetic_tasks, tmp_path_factory):
    """MoSEs over the three synthetic tasks, with the pull constraint on and off."""
    root = tmp_path_factory.mktemp("moses")
    cfg = TrainConfig(model=str(tiny_dir), method="moses", max_train=32, epochs=20, batch_size=16, micro_batch=16,
                      lr=3e-2, max_source=96, max_target=8)
    return {w: train_sequence(replace(cfg, pull_weight=w, out=str(root / f"pull{w}")), synthetic_tasks) for w in (0.1, 0.0)}


def stage(run, i):
    return Expert.load(next(run.glob(f"{i}-*")) / "expert")


def test_an_earlier_tasks_outputs_are_bit_identical_after_later_tasks(moses_runs, tiny_dir, synthetic_tasks):
    run = moses_runs[0.1]
    model, tok = load_dir(tiny_dir)
    first, last = stage(run, 1), stage(run, 3)
    first.attach(model)
    xs = [torch.tensor([prompt_ids(tok, ex.query, 96)]) for ex in load_task(synthetic_tasks[0], "eval")[:4]]
    outputs = []
    for e in (first, last):  # the system after stage 1, then after stage 3, both given task 1 (TIL)
        e.use(model)
        lora.set_task(model, first.name)
        outputs.append([model(x) for x in xs])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    lora.set_task(model, last.name)
    assert not torch.equal(model(xs[0]), outputs[0][0]), "another task's masks compute something else"


def key_accuracy(run, tiny_dir, tasks, eval_queries):
    model, tok = load_dir(tiny_dir)
    last = stage(run, len(tasks))
    last.attach(model)
    last.use(model)
    prompts, gold = eval_queries(tok, tasks)
    return sum(r == g for r, g in zip(match_keys(query_features(model, prompts), last.keys), gold)) / len(gold)


def test_the_pull_constraint_aligns_keys_with_their_tasks(moses_runs, tiny_dir, synthetic_tasks, eval_queries):
    assert key_accuracy(moses_runs[0.0], tiny_dir, synthetic_tasks, eval_queries) < 0.9, "random keys: task identification degrades"
    assert key_accuracy(moses_runs[0.1], tiny_dir, synthetic_tasks, eval_queries) >= 0.95


def test_tasks_reuse_sub_expert_weights_so_storage_grows_sublinearly(moses_runs):
    counts = []
    for i in (1, 2, 3):
        e = stage(moses_runs[0.1], i)
        counts.append(dict(mask=sum(int(v.sum()) for k, v in e.adapter.items() if f".masks.{e.name}." in k),
                           stored=sum(int(v.sum()) for k, v in e.adapter.items() if ".used_" in k)))
    for before, after in zip(counts, counts[1:]):
        assert before["stored"] < after["stored"] < before["stored"] + after["mask"], "a new task reuses held weights"


def test_evaluation_reports_til_tail_and_parameters_per_stage(moses_runs):
    result, predictions = evaluate_run(moses_runs[0.1], max_eval=4, max_new_tokens=3)
    assert [len(row) for row in result["til_scores"]] == [len(row) for row in result["scores"]] == [1, 2, 3]
    assert result["til_bwt"] == 0.0, "TIL: the earlier tasks' masks and weights are untouched"
    assert result["task_id_accuracy"] == pytest.approx(
        sum(p["route"] == Path(p["task"]).stem for p in predictions) / len(predictions))
    params = result["parameters"]
    assert len(params) == 3 and all(p["new"] < p["mask"] for p in params[1:]), "later tasks reuse held weights"
    assert [p["trainable"] for p in params] == [2 * params[0]["scores"] - held + 64 for held in
                                                 (0, params[0]["stored"], params[1]["stored"])], "free weights + scores + key"
