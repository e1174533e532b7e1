"""SETA: shared experts kept by elastic anchoring, MoSEs' masked sub-experts as task experts, and a
unified gate kept by routing regularisation that picks the task without being told it."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lora
from checkpoint import load_dir
from errors import UserError
from evaluate import evaluate_run
from experts import Expert
from router import key_route, match_keys, query_features
from train import TrainConfig, train_sequence

WEIGHTS = {"both": (1.0, 1.0), "no-anchor": (0.0, 1.0), "no-route-reg": (1.0, 0.0)}


@pytest.fixture(scope="module")
def seta_runs(tiny_dir, synthetic_tasks, tmp_path_factory):
    """SETA over the three synthetic tasks: with both regularisers, and with each one off."""
    root = tmp_path_factory.mktemp("seta")
    cfg = TrainConfig(model=str(tiny_dir), method="seta", max_train=32, epochs=20, batch_size=16, micro_batch=16,
                      lr=3e-2, max_source=96, max_target=8, tau=0.25)
    return {name: train_sequence(replace(cfg, anchor_weight=a, route_reg_weight=r, out=str(root / name)), synthetic_tasks)
            for name, (a, r) in WEIGHTS.items()}


def stage(run, i):
    return Expert.load(next(run.glob(f"{i}-*")) / "expert")


def shared(expert, kind=""):
    """The shared experts' weights (kind "") or their importance (kind "importance_"), by state key."""
    return {k: v for k, v in expert.adapter.items() if k.endswith(tuple(f".{kind}{s}" for s in lora.SHARED))}


def weighted_drift(run) -> float:
    """sum F (theta - theta*)^2 of the shared experts from stage 1 to stage 2, F their importance to task 1."""
    first, second = stage(run, 1), stage(run, 2)
    weights, importance = shared(first), shared(first, "importance_")
    return sum(float((importance[k.replace(".shared_", ".importance_shared_")] * (second.adapter[k] - w) ** 2).sum())
               for k, w in weights.items())


def test_elastic_anchoring_keeps_the_important_shared_weights_near_their_earlier_values(seta_runs):
    anchored, free = weighted_drift(seta_runs["both"]), weighted_drift(seta_runs["no-anchor"])
    assert anchored < 0.1 * free
    first, second = stage(seta_runs["both"], 1), stage(seta_runs["both"], 2)
    assert any(not torch.equal(v, second.adapter[k]) for k, v in shared(first).items()), "anchored, not frozen"


def test_routing_regularisation_keeps_the_gates_choices_on_earlier_tasks(seta_runs, tiny_dir, synthetic_tasks, eval_queries):
    model, tok = load_dir(tiny_dir)
    stage(seta_runs["both"], 1).attach(model)
    feats = query_features(model, eval_queries(tok, synthetic_tasks[:2])[0])  # the first two tasks' queries
    def changed(run):  # the share of them the gate sends elsewhere after stage 3 than after stage 2
        before, after = (match_keys(feats, stage(run, i).keys, gate=True) for i in (2, 3))
        return sum(a != b for a, b in zip(before, after)) / len(feats)
    assert changed(seta_runs["both"]) <= 0.05
    assert changed(seta_runs["no-route-reg"]) >= 0.5, "unregularised, the gate sends earlier queries to the newest task"


def test_the_gate_alone_picks_each_querys_task_experts(seta_runs, tiny_dir, synthetic_tasks, eval_queries):
    model, tok = load_dir(tiny_dir)
    last = stage(seta_runs["both"], 3)
    last.attach(model)
    last.use(model)
    prompts, gold = eval_queries(tok, synthetic_tasks)
    answers, routes = key_route(model, last.keys, prompts, 2, tok.eos_ids, gate=True)  # no task given
    assert len(answers) == len(prompts) and sum(r == g for r, g in zip(routes, gold)) / len(gold) >= 0.95


def test_a_stage_stores_its_shared_experts_importance_and_one_gate_row_per_task(seta_runs, tiny_dir):
    last = stage(seta_runs["both"], 3)
    assert list(last.keys) == ["colour", "count", "mood"]
    model, _ = load_dir(tiny_dir)
    last.attach(model)
    last.use(model)
    for (p, imp) in lora.shared_weights(model):
        assert imp.mean() > 0 and p.abs().sum() > 0
    moses_state = {k: v for k, v in last.adapter.items() if "shared" not in k}
    with pytest.raises(UserError, match="missing"):
        lora.load_subexpert_state(model, moses_state)


def test_evaluation_reports_gate_accuracy_and_what_each_stage_trains(seta_runs):
    result, predictions = evaluate_run(seta_runs["both"], max_eval=4, max_new_tokens=3)
    assert result["label"] == "SETA(c=0.3)" and [len(row) for row in result["til_scores"]] == [1, 2, 3]
    assert result["task_id_accuracy"] == pytest.approx(
        sum(p["route"] == Path(p["task"]).stem for p in predictions) / len(predictions))
    params = result["parameters"]
    shared_weights = params[0]["shared"]
    assert shared_weights > 0
    assert [p["trainable"] for p in params] == [2 * params[0]["scores"] - held + shared_weights + rows * 64 for held, rows in
                                                 ((0, 1), (params[0]["stored"], 2), (params[1]["stored"], 3))]
