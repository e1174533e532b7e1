"""Sequential routing: newest expert first, the first o_pos answers, unclaimed queries reach the base model."""
import copy
from dataclasses import replace

import pytest
import torch

from checkpoint import load_dir
from data import load_task
from experts import Expert, base_model, prompt_ids, setup_indicators
from model import generate
from router import BASE, parallel_route, sequential_route
from train import train


@pytest.fixture(scope="module")
def system(separable_run, tiny_dir, tmp_path_factory):
    """The tiny base model with two experts attached: sa (trained first, pe as negatives) and pe (sa as negatives)."""
    sa_cfg, sa_run = separable_run
    pe_run = train(replace(sa_cfg, task="pe", previous=["sa"], out=str(tmp_path_factory.mktemp("runs") / "pe")))
    model, tok = load_dir(tiny_dir)
    ind = setup_indicators(model, tok)
    experts = [Expert.load(sa_run / "expert"), Expert.load(pe_run / "expert")]
    for e in experts:
        e.attach(model)
    queries = {t: [prompt_ids(tok, ex.query, sa_cfg.max_source) for ex in load_task(t, "eval")[:6]] for t in ("sa", "pe", "qa")}
    return model, tok, ind, experts, queries


def route(system, experts, prompts, batch_size=16):
    model, tok, ind, _, _ = system
    return sequential_route(model, experts, ind, prompts, 4, tok.eos_ids, batch_size)


def test_each_query_reaches_the_expert_of_its_task(system):
    _, _, _, experts, queries = system
    _, routes = route(system, experts, queries["sa"] + queries["pe"])
    assert routes == ["sa"] * 6 + ["pe"] * 6


def test_the_newest_claiming_expert_answers(system):
    model, _, _, experts, queries = system
    newer = replace(experts[0], name="sa_again")  # the same expert once more, later in the sequence
    newer.attach(model)
    _, routes = route(system, [experts[0], newer], queries["sa"])
    assert routes == ["sa_again"] * 6


def test_a_claimed_answer_is_the_experts_own_continuation_after_o_pos(system):
    model, tok, ind, experts, queries = system
    answers, _ = route(system, experts, queries["pe"][:2])
    experts[1].use(model)
    own = generate(model, queries["pe"][:2], 4 + len(ind.pos), tok.eos_ids, prefix=ind.pos, ban=ind.added)
    assert [o[:len(ind.pos)] for o in own] == [ind.pos] * 2 and answers == [o[len(ind.pos):] for o in own]


def test_an_answer_never_holds_the_added_indicator_tokens(system):
    model, tok, ind, experts, queries = system
    loud = replace(experts[1], name="loud", rows={k: v.clone() for k, v in experts[1].rows.items()})
    for v in loud.rows.values():
        v[0] *= 50  # o_pos's row dominates every position: the expert claims all and would repeat it
    loud.attach(model)
    loud.use(model)
    k = len(ind.pos)
    unguarded = generate(model, queries["sa"], 4 + k, tok.eos_ids)
    assert all(o[:k] == ind.pos and set(o[k:]) & set(ind.added) for o in unguarded)
    routed = sequential_route(model, [loud], ind, queries["sa"], 4, tok.eos_ids)
    assert routed[1] == ["loud"] * 6 and all(a and not set(a) & set(ind.added) for a in routed[0])
    assert parallel_route(model, [loud], ind, queries["sa"], 4, tok.eos_ids) == routed


def test_unclaimed_queries_reach_the_base_model(system):
    model, tok, _, experts, queries = system
    answers, routes = route(system, experts[1:], queries["sa"])  # the pe expert refuses sa queries
    assert routes == [BASE] * 6
    with base_model(model):
        assert answers == generate(model, queries["sa"], 4, tok.eos_ids)


def test_batched_routing_equals_routing_one_query_at_a_time(system):
    _, _, _, experts, queries = system
    mixed = [q for pair in zip(queries["sa"], queries["pe"], queries["qa"]) for q in pair]
    batched = route(system, experts, mixed, batch_size=4)
    alone = [route(system, experts, [q]) for q in mixed]
    assert batched == ([a[0][0] for a in alone], [a[1][0] for a in alone])


def mixed_queries(queries):
    return [q for pair in zip(queries["sa"], queries["pe"], queries["qa"]) for q in pair]


@pytest.mark.parametrize("batch_size", [16, 5])
def test_parallel_routing_makes_the_same_decisions_and_answers_as_sequential(system, batch_size):
    model, tok, ind, experts, queries = system
    mixed = mixed_queries(queries)
    parallel = parallel_route(model, experts, ind, mixed, 4, tok.eos_ids, batch_size)
    assert parallel == sequential_route(model, experts, ind, mixed, 4, tok.eos_ids, batch_size)
    assert set(parallel[1]) == {"sa", "pe", BASE}


def test_parallel_routing_equals_sequential_on_random_adapters(system, device):
    model, tok, ind, experts, queries = system
    gen = torch.Generator().manual_seed(0)
    noisy = []
    for j, e in enumerate(experts * 2):  # four experts: the trained ones, perturbed at random
        adapter = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) for k, v in e.adapter.items()}
        rows = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) for k, v in e.rows.items()}
        noisy.append(replace(e, name=f"noisy{j}", adapter=adapter, rows=rows))
        noisy[-1].attach(model)
    model = copy.deepcopy(model).to(device)  # with every attached adapter
    mixed = mixed_queries(queries)
    parallel = parallel_route(model, noisy, ind, mixed, 6, tok.eos_ids, 8)
    assert parallel == sequential_route(model, noisy, ind, mixed, 6, tok.eos_ids, 8)
    assert len(set(parallel[1])) >= 2, "queries the newest expert refuses fall through to older ones"
