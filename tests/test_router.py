"""Sequential routing: newest expert first; o_pos answers, o_neg passes the query on, neither
indicator sends it to the base model at once, as does every expert refusing it."""
import copy
from dataclasses import replace

import pytest
import torch

from checkpoint import load_dir
from data import load_task
from experts import NEITHER, Indicators, base_model, load_expert, prompt_ids, setup_indicators
from model import generate
from errors import UserError
from bench.parallel import parallel_route
from router import BASE, Routed, generate_batched, sequential_route
from train import train


@pytest.fixture(scope="module")
def system(separable_run, tiny_dir, tmp_path_factory):
    """The tiny base model with two experts attached: sa (trained first, pe as negatives) and pe (sa
    as negatives)."""
    sa_cfg, sa_run = separable_run
    pe_run = train(replace(sa_cfg, task="pe", previous=["sa"],
                           out=str(tmp_path_factory.mktemp("runs") / "pe")))
    model, tok = load_dir(tiny_dir)
    ind = setup_indicators(model, tok)
    experts = [load_expert(sa_run / "expert"), load_expert(pe_run / "expert")]
    for e in experts:
        e.attach(model)
    queries = {t: [prompt_ids(tok, ex.query, sa_cfg.max_source) for ex in load_task(t, "eval")[:6]]
               for t in ("sa", "pe", "qa")}
    return model, tok, ind, experts, queries


def route(system, experts, prompts, batch_size=16) -> Routed:
    model, tok, ind, _, _ = system
    return sequential_route(model, experts, ind, prompts, 4, tok.eos_ids, batch_size)


def test_each_query_reaches_the_expert_of_its_task(system):
    _, _, _, experts, queries = system
    routed = route(system, experts, queries["sa"] + queries["pe"])
    assert routed.routes == ["sa"] * 6 + ["pe"] * 6
    ind = system[2]
    assert routed.visits == [[("pe", ind.neg), ("sa", ind.pos)]] * 6 + [[("pe", ind.pos)]] * 6


def test_the_newest_claiming_expert_answers(system):
    model, _, _, experts, queries = system
    newer = replace(experts[0], name="sa_again")  # the same expert once more, later in the sequence
    newer.attach(model)
    assert route(system, [experts[0], newer], queries["sa"]).routes == ["sa_again"] * 6


def test_a_claimed_answer_is_the_experts_own_continuation_after_o_pos(system):
    model, tok, ind, experts, queries = system
    answers = route(system, experts, queries["pe"][:2]).answers
    experts[1].use(model)
    own = generate(model, queries["pe"][:2], 4 + len(ind.pos), tok.eos_ids, prefixes=[ind.pos],
                   ban=ind.added)
    assert ([o[:len(ind.pos)] for o in own] == [ind.pos] * 2
            and answers == [o[len(ind.pos):] for o in own])


def test_an_answer_never_holds_the_added_indicator_tokens(system):
    model, tok, ind, experts, queries = system
    loud = replace(experts[1], name="loud", rows={k: v.clone() for k, v in experts[1].rows.items()})
    for v in loud.rows.values():
        # o_pos's row dominates every position: the expert claims all and would repeat it
        v[0] *= 50
    loud.attach(model)
    loud.use(model)
    k = len(ind.pos)
    unguarded = generate(model, queries["sa"], 4 + k, tok.eos_ids)
    assert all(o[:k] == ind.pos and set(o[k:]) & set(ind.added) for o in unguarded)
    routed = sequential_route(model, [loud], ind, queries["sa"], 4, tok.eos_ids)
    assert routed.routes == ["loud"] * 6 and all(a and not set(a) & set(ind.added)
                                                 for a in routed.answers)
    assert parallel_route(model, [loud], ind, queries["sa"], 4, tok.eos_ids) == routed


def test_unclaimed_queries_reach_the_base_model(system):
    model, tok, _, experts, queries = system
    routed = route(system, experts[1:], queries["sa"])  # the pe expert refuses sa queries
    assert routed.routes == [BASE] * 6
    with base_model(model):
        assert routed.answers == generate(model, queries["sa"], 4, tok.eos_ids)


@pytest.fixture(scope="module")
def mute(system):
    """The sa expert with its indicator rows zeroed: on these queries it emits neither indicator."""
    model, _, _, experts, _ = system
    zeroed = replace(experts[0], name="mute",
                     rows={k: torch.zeros_like(v) for k, v in experts[0].rows.items()})
    zeroed.attach(model)
    return zeroed


def test_an_expert_that_emits_neither_indicator_sends_the_query_to_the_base_model(system, mute):
    model, tok, ind, experts, queries = system
    older = experts[0]  # the sa expert, which would claim these queries
    routed = route(system, [older, mute], queries["sa"])
    assert [[ind.read(t) for _, t in v] for v in routed.visits] == [[NEITHER]] * 6, "precondition"
    assert routed.routes == [BASE] * 6, (
        "the paper's rule: straight to the base model, the older expert unasked")
    with base_model(model):
        assert routed.answers == generate(model, queries["sa"], 4, tok.eos_ids)


def test_parallel_routing_takes_the_exception_path_as_sequential_does(system, mute):
    model, tok, ind, experts, queries = system
    chain = [experts[0], mute, experts[1]]  # pe refuses sa queries, then mute emits neither
    mixed = mixed_queries(queries)
    parallel = parallel_route(model, chain, ind, mixed, 4, tok.eos_ids, 5)
    assert parallel == sequential_route(model, chain, ind, mixed, 4, tok.eos_ids, 5)
    assert not any(r == "sa" for r in parallel.routes), "the older sa expert is never asked"


def test_batched_routing_equals_routing_one_query_at_a_time(system):
    _, _, _, experts, queries = system
    mixed = [q for pair in zip(queries["sa"], queries["pe"], queries["qa"]) for q in pair]
    batched = route(system, experts, mixed, batch_size=4)
    alone = [route(system, experts, [q]) for q in mixed]
    assert batched == Routed(*([getattr(a, f)[0] for a in alone]
                               for f in ("answers", "routes", "visits")))


def mixed_queries(queries):
    return [q for pair in zip(queries["sa"], queries["pe"], queries["qa"]) for q in pair]


@pytest.mark.parametrize("batch_size", [16, 5])
def test_parallel_routing_makes_the_same_decisions_and_answers_as_sequential(system, batch_size):
    model, tok, ind, experts, queries = system
    mixed = mixed_queries(queries)
    parallel = parallel_route(model, experts, ind, mixed, 4, tok.eos_ids, batch_size)
    assert parallel == sequential_route(model, experts, ind, mixed, 4, tok.eos_ids, batch_size)
    assert set(parallel.routes) == {"sa", "pe", BASE}


def test_parallel_routing_equals_sequential_on_random_adapters(system, device):
    model, tok, ind, experts, queries = system
    gen = torch.Generator().manual_seed(0)
    noisy = []
    for j, e in enumerate(experts * 2):  # four experts: the trained ones, perturbed at random
        adapter = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) for k,
                   v in e.adapter.items()}
        rows = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) for k,
                v in e.rows.items()}
        noisy.append(replace(e, name=f"noisy{j}", adapter=adapter, rows=rows))
        noisy[-1].attach(model)
    model = copy.deepcopy(model).to(device)  # with every attached adapter
    mixed = mixed_queries(queries)
    parallel = parallel_route(model, noisy, ind, mixed, 6, tok.eos_ids, 8)
    assert parallel == sequential_route(model, noisy, ind, mixed, 6, tok.eos_ids, 8)
    assert len(set(parallel.routes)) >= 2, (
        "queries the newest expert refuses fall through to older ones")


def test_router_cli_shows_each_expert_step_and_who_answered(system, tmp_path, capsys, monkeypatch):
    import json
    import router
    experts = system[3]
    run = tmp_path / "run"
    for e in experts:  # a SEE system directory: system.json and one expert per stage
        (run / e.name).mkdir(parents=True)
        e.save(run / e.name / "expert")
    import dataclasses
    from artifacts import seal
    from runs import PER_STAGE, TrainConfig
    settings = {k: v for k, v in dataclasses.asdict(TrainConfig(tau=1.0)).items()
                if k not in PER_STAGE}
    (run / "system.json").write_text(json.dumps(seal(dict(
        method="see", model="tiny", tasks=["sa", "pe"], settings=settings,
        experts=["sa/expert", "pe/expert"]))))
    monkeypatch.setattr("sys.argv", ["router.py", "--run", str(run), "--task", "sa", "--index", "0",
                                     "--max-new-tokens", "3"])
    router.main()
    lines = capsys.readouterr().out.splitlines()
    steps = [line.split() for line in lines if line.startswith("  expert")]
    assert [(s[2], s[4], s[5]) for s in steps] == [("pe", "'<<neg>>'", "o_neg"),
                                                   ("sa", "'<<pos>>'", "o_pos")]
    assert "answered by: sa" in lines and any(line.startswith("reference: ") for line in lines)


def test_router_cli_routes_over_expert_directories_given_oldest_first(system, tmp_path, capsys,
                                                                       monkeypatch):
    import router
    dirs = []
    for e in system[3]:
        e.save(tmp_path / e.name)
        dirs += ["--expert", str(tmp_path / e.name)]
    monkeypatch.setattr("sys.argv", ["router.py", *dirs, "--task", "sa", "--index", "0",
                                     "--max-new-tokens", "3"])
    router.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines if line.startswith("  expert")] == ["pe", "sa"]
    assert "answered by: sa" in lines


def test_generation_refuses_sequences_longer_than_the_context(tiny):
    model, _ = tiny
    with pytest.raises(UserError, match="exceed the model's context of 2048"):
        generate_batched(model, [[1] * 2040], 10, eos_ids=[2])


def test_parallel_routing_with_in_vocabulary_indicators_equals_sequential(system):
    model, tok, _, experts, queries = system
    ind = Indicators("semantic", tok.encode("Yes", bos=False), tok.encode("No", bos=False))
    plain = [replace(e, rows={}) for e in experts]  # their adapters, no added-token rows
    mixed = mixed_queries(queries)
    parallel = parallel_route(model, plain, ind, mixed, 4, tok.eos_ids, 5)
    assert parallel == sequential_route(model, plain, ind, mixed, 4, tok.eos_ids, 5)
    assert all(v for v in parallel.visits), "every query met at least one expert"
