"""SETA: shared experts kept by elastic anchoring, MoSEs' masked sub-experts as task experts, and a
unified gate kept by routing regularisation that picks the task without being told it."""
import contextlib
import functools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gate
import lora
import train as train_mod
from checkpoint import load_dir
from data import load_task
from errors import UserError
from evaluate import evaluate_run
from experts import load_expert, prompt_ids, reconstruct
from gate import (GATE_SCALE, gate_logits, gate_loss, match_keys, query_features,
                  routing_regulariser)
from rehearsal import training_data
from router import key_route
from train import TrainConfig, eq5_loss, train, train_sequence, trainable_parameters

WEIGHTS = {"both": (1.0, 1.0), "no-anchor": (0.0, 1.0), "no-route-reg": (1.0, 0.0)}


@pytest.fixture(scope="module")
def seta_runs(tiny_dir, synthetic_tasks, tmp_path_factory):
    """SETA over the three synthetic tasks: with both regularisers, and with each one off."""
    root = tmp_path_factory.mktemp("seta")
    cfg = TrainConfig(model=str(tiny_dir), method="seta", max_train=32, epochs=20, batch_size=16,
                      micro_batch=16, lr=3e-2, max_source=96, max_target=8, tau=0.25)
    return {name: train_sequence(replace(cfg, anchor_weight=a, route_reg_weight=r,
                                         out=str(root / name)), synthetic_tasks)
            for name, (a, r) in WEIGHTS.items()}


def stage(run, i):
    return load_expert(next(run.glob(f"{i}-*")) / "expert")


def shared(expert, kind=""):
    """The shared experts' weights (kind "") or their importance (kind "importance_", in the
    training state), by key."""
    state = expert.training if kind else expert.adapter
    return {k: v for k, v in state.items() if k.endswith(tuple(f".{kind}{s}" for s in lora.SHARED))}


def weighted_drift(run) -> float:
    """sum F (theta - theta*)^2 of the shared experts from stage 1 to stage 2, F their
    importance to task 1."""
    first, second = stage(run, 1), stage(run, 2)
    weights, importance = shared(first), shared(first, "importance_")
    return sum(float((importance[k.replace(".shared_", ".importance_shared_")]
                      * (second.adapter[k] - w) ** 2).sum())
               for k, w in weights.items())


@pytest.mark.slow
def test_elastic_anchoring_keeps_the_important_shared_weights_near_their_earlier_values(seta_runs):
    anchored, free = weighted_drift(seta_runs["both"]), weighted_drift(seta_runs["no-anchor"])
    assert anchored < 0.1 * free
    first, second = stage(seta_runs["both"], 1), stage(seta_runs["both"], 2)
    assert any(not torch.equal(v, second.adapter[k]) for k,
               v in shared(first).items()), "anchored, not frozen"


def test_routing_regularisation_keeps_the_gates_outputs_on_earlier_tasks_nearer_what_they_were():
    """The gate trained on a new task's queries near an earlier task's, with and without the
    regulariser on remembered queries: its outputs on held-out earlier queries drift far less.
    (On the tiny fixture the cosine gate's outputs are saturated, so there it changes little.)"""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g)
    centres[2] = 0.5 * centres[0] + 0.5 * torch.randn(8, generator=g)  # the new task, near task 0
    def queries(task, n):
        return centres[task] + 0.5 * torch.randn(n, 8, generator=g)
    old_rows = torch.stack([F.normalize(queries(t, 16), dim=-1).mean(0) for t in range(2)])
    memory = torch.cat([queries(0, 4), queries(1, 4)])
    heldout = torch.cat([queries(0, 32), queries(1, 32)])
    new = queries(2, 16)
    old = F.softmax(gate_logits(memory, old_rows), dim=-1)
    def drift(weight):
        imprint = F.normalize(new, dim=-1).mean(0, keepdim=True)
        rows = torch.nn.Parameter(torch.cat([old_rows, imprint]))
        opt = torch.optim.Adam([rows], lr=0.05)
        for _ in range(30):
            reg = routing_regulariser(rows, memory, old)
            loss = gate_loss(rows, new, torch.full((len(new),), 2)) + weight * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
        before = F.softmax(gate_logits(heldout, old_rows), dim=-1)
        return float(routing_regulariser(rows.detach(), heldout, before))
    assert drift(1.0) < 0.5 * drift(0.0)


def test_routing_regularisation_enters_seta_training(seta_runs):
    logged = [json.loads(line) for line in (next(seta_runs["both"].glob("2-*")) / "log.jsonl")
              .read_text().splitlines()]
    assert all(r["route_reg"] >= 0 for r in logged) and any(r["route_reg"] > 0 for r in logged)
    rows = [stage(seta_runs[name], 3).keys for name in ("both", "no-route-reg")]
    assert any(not torch.equal(rows[0][t], rows[1][t]) for t in rows[0]), "it changes the gate"


def gate_accuracy(rows, tiny_dir, tasks, eval_queries):
    model, tok = load_dir(tiny_dir)
    prompts, gold = eval_queries(tok, tasks)
    routes = match_keys(query_features(model, prompts), rows)
    return sum(r == g for r, g in zip(routes, gold)) / len(gold)


def test_the_trained_gate_picks_tasks_at_least_as_well_as_its_imprinted_start(
        seta_runs, tiny_dir, synthetic_tasks, eval_queries):
    last = stage(seta_runs["both"], 3)
    assert (list(last.imprints) == list(last.keys)
            and any(not torch.equal(last.imprints[t], last.keys[t]) for t in last.keys))
    trained = gate_accuracy(last.keys, tiny_dir, synthetic_tasks, eval_queries)
    assert trained >= gate_accuracy(last.imprints, tiny_dir, synthetic_tasks,
                                    eval_queries) and trained >= 0.95
    # its cross-entropy over every task's rows holds earlier tasks' queries even
    # without routing regularisation
    unregularised = stage(seta_runs["no-route-reg"], 3)
    assert gate_accuracy(unregularised.keys, tiny_dir, synthetic_tasks, eval_queries) >= \
        gate_accuracy(unregularised.imprints, tiny_dir, synthetic_tasks, eval_queries)


def test_the_gates_choice_decides_which_experts_answer(seta_runs, tiny_dir, synthetic_tasks,
                                                       eval_queries):
    model, tok = load_dir(tiny_dir)
    last = stage(seta_runs["both"], 3)
    last.attach(model)
    last.use(model)
    prompts, _ = eval_queries(tok, synthetic_tasks, n=4)
    mean = F.normalize(query_features(model, prompts), dim=-1).mean(0)
    side = F.normalize(torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)), dim=0)
    # the middle task: neither the first nor the newest
    rows = {"colour": -mean, "count": mean, "mood": side}
    answers, routes = key_route(model, rows, prompts, 2, tok.eos_ids)
    assert set(routes) == {"count"}
    assert answers == key_route(model, rows, prompts, 2, tok.eos_ids, task="count")[0]
    assert answers != key_route(model, rows, prompts, 2, tok.eos_ids,
                                task="colour")[0], "the tasks answer differently"


def test_a_gate_rows_norm_cannot_claim_queries():
    """The gate is a cosine classifier: on SmolLM2 a plain linear gate let the routing regulariser
    grow the oldest row until it took every query (README)."""
    features = torch.tensor([[1.0, 0.1], [1.0, -0.1]])  # as alike as SmolLM2's query features
    rows = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert gate_logits(features, rows).argmax(-1).tolist() == [0, 1]
    assert gate_logits(features, rows * torch.tensor([[10.0], [1.0]])).argmax(-1).tolist() == [0, 1]
    assert match_keys(features, {"a": 10 * rows[0], "b": rows[1]}) == ["a", "b"]
    # and the logits are scaled: a softmax over raw cosines would be nearly flat
    assert F.softmax(gate_logits(features, rows), dim=-1)[0, 0] > 0.9


def test_routing_regulariser_is_the_kl_of_the_old_outputs_to_the_new_ones_on_remembered_queries():
    memory, old_rows = torch.eye(2), torch.eye(2)
    old = F.softmax(gate_logits(memory, old_rows), dim=-1)
    nothing = routing_regulariser(old_rows, memory, old)
    assert nothing == pytest.approx(0.0, abs=1e-7), "nothing changed"
    between = torch.cat([old_rows, torch.ones(1, 2)])  # a new row at 45 degrees to both queries
    s, c = GATE_SCALE, GATE_SCALE * math.cos(math.pi / 4)
    p_old = torch.softmax(torch.tensor([s, 0.0]), 0)
    p_new = torch.softmax(torch.tensor([s, 0.0, c]), 0)[:2]
    expected = float((p_old * (p_old.log() - p_new.log())).sum())
    assert routing_regulariser(between, memory, old).item() == pytest.approx(expected, rel=1e-4)
    # a new row nearer the first query than that query's own row
    claiming = torch.cat([old_rows, torch.tensor([[1.0, 0.2]])])
    assert routing_regulariser(claiming, memory, old) > routing_regulariser(between, memory, old)


def test_importance_is_the_fisher_a_weight_that_cannot_change_the_loss_has_none(tiny,
                                                                                synthetic_tasks):
    model, tok = tiny
    lora.add_subexperts(model, lora.LoraConfig(), lora.SubExpertConfig(shared=1))
    lora.set_task(model, "colour", learning=True)
    trainable_parameters(model, None, False)
    samples = reconstruct(load_task(synthetic_tasks[0], "train")[:8], [], tok, None, 96, 8)
    model.eval()
    imp = gate.importance(model, [functools.partial(eq5_loss, model, model.hidden, [s],
                                                    len(s.ids) - s.start, "cpu",
                                                    contextlib.nullcontext()) for s in samples])
    by_kind = {k: [f for f, (p, _) in zip(imp, lora.shared_weights(model)) if p is getattr(m, k)]
               for m in lora.subexpert_layers(model).values() for k in lora.SHARED}
    # shared experts start with B = 0, so no change of A changes the loss, while B's gradient is A x
    assert all(float(f.abs().max()) == 0.0 for f in by_kind["shared_A"])
    assert all(float(f.min()) >= 0 and float(f.max()) > 0 for f in by_kind["shared_B"])


def test_earlier_tasks_masks_and_held_weights_stay_frozen(seta_runs, tiny_dir):
    layers = []
    for i in (1, 3):
        model, _ = load_dir(tiny_dir)
        e = stage(seta_runs["both"], i)
        e.attach(model)
        e.use(model)
        layers.append(lora.subexpert_layers(model))
    for path, m in layers[0].items():
        for k in lora.MASKED:
            held = getattr(m, f"used_{k}")
            assert torch.equal(m.masks["colour"][k], layers[1][path].masks["colour"][k])
            assert torch.equal(getattr(m, k)[held], getattr(layers[1][path], k)[held]), (path, k)


def test_remembered_queries_reach_the_gate_but_never_the_experts_loss(
        seta_runs, tiny_dir, synthetic_tasks, tmp_path, monkeypatch):
    cfg = TrainConfig(model=str(tiny_dir), method="seta", task=synthetic_tasks[1],
                      previous=synthetic_tasks[:1],
                      init=str(next(seta_runs["both"].glob("1-*")) / "expert"), max_train=32,
                      epochs=1, batch_size=16,
                      micro_batch=16, max_source=96, max_target=8, tau=0.25,
                      out=str(tmp_path / "count"))
    _, tok = load_dir(tiny_dir)
    remembered = [prompt_ids(tok, ex.query, 96) for ex in training_data(cfg)[1]]
    seen, loss = [], train_mod.eq5_loss
    def recording(model, hidden, batch, *args):
        seen.extend(s.ids[:s.start] for s in batch)
        return loss(model, hidden, batch, *args)
    monkeypatch.setattr(train_mod, "eq5_loss", recording)
    train(cfg)
    assert remembered and seen and not any(q in remembered for q in seen)


def test_a_stage_stores_its_shared_experts_importance_and_one_gate_row_per_task(seta_runs,
                                                                                tiny_dir):
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
    with pytest.raises(UserError, match="missing"):
        lora.load_subexpert_state(model, last.adapter,
                                  {k: v for k, v in last.training.items() if "importance" not in k})


def test_evaluation_reports_gate_accuracy_and_what_each_stage_trains(seta_runs,
                                                                     check_stage_parameters):
    result, predictions = evaluate_run(seta_runs["both"], max_eval=4, max_new_tokens=3)
    assert (result["label"] == "SETA(c=0.3)"
            and [len(row) for row in result["til_scores"]] == [1, 2, 3])
    assert result["task_id_accuracy"] == pytest.approx(
        sum(p["route"] == Path(p["task"]).stem for p in predictions) / len(predictions))
    assert 0 <= result["imprinted_accuracy"] <= 1
    shared_weights = sum(v.numel() for v in shared(stage(seta_runs["both"], 1)).values())
    assert result["parameters"][0]["shared"] == shared_weights > 0
    # a stage trains the shared experts and one gate row (of dim 64) per task so far
    check_stage_parameters(seta_runs["both"], result["parameters"],
                           extra=lambda i: shared_weights + (i + 1) * 64)
