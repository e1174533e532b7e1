"""evaluate.py --report: the paper's tables and figures rendered from evaluated
runs (here hand-made ones)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import report
from artifacts import digest, seal
from runs import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["qa", "sa"]


def fake_run(root: Path, name: str, method: str, scores, tau=0.1, negatives="tasks",
             indicator="added", predictions=(), tasks=TASKS, **extra) -> str:
    """A run directory as train.py and evaluate.py --run leave it, with made-up results."""
    run = root / name
    run.mkdir()
    settings = dict(dataclasses.asdict(TrainConfig()), tau=tau, negatives=negatives,
                    indicator=indicator, max_train=64, seed=0, epochs=3, batch_size=16, lr=1e-3,
                    max_source=512, max_target=128, sparsity=0.3)
    experts = [f"{i + 1}-{t}/expert" for i, t in enumerate(tasks[:1] if method == "mtl" else tasks)]
    (run / "system.json").write_text(json.dumps(seal(dict(method=method, model="tiny", tasks=tasks,
                                                          experts=experts, settings=settings))))
    result = dict(run=str(run), method=method, label=name, tasks=tasks, scores=scores,
                  ar=sum(scores[-1]) / len(scores[-1]),
                  bwt=None, routing_f1=None, per_task_routing=None, rb_acc=None, ood_routes=None,
                  n_ood=None, routing_steps=None, routing="sequential", parameters=[],
                  max_eval=20, max_new_tokens=64, device=None, train_seconds=None,
                  eval_seconds=None)
    result.update(extra)
    preds = run / "eval.predictions.jsonl"
    preds.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    (run / "eval.json").write_text(json.dumps(seal(dict(result, predictions_sha256=digest(preds)))))
    return str(run)


def rewrite(path: Path, change) -> None:
    """Edit a sealed JSON file of a run by `change(record)`, sealed again as train.py would."""
    record = json.loads(path.read_text())
    record.pop("sha256")
    change(record)
    path.write_text(json.dumps(seal(record)))


def pred(task, prediction, reference, perplexity):
    return dict(task=task, id=f"{task}-x", prediction=prediction, references=[reference],
                perplexity=perplexity)


def see(root, name, tau=0.1, negatives="tasks", indicator="added", ar_scores=(10.0, 50.0), f1=0.9,
        sa_hits=1, ppl=2.0):
    preds = [pred("qa", "an answer", "the answer", ppl), pred("qa", "x", "y", 2 * ppl)]
    preds += [pred("sa", "Positive " if i < sa_hits else "negative", "positive", ppl)
              for i in range(2)]
    return fake_run(root, name, "see", [[12.0], list(ar_scores)], tau, negatives, indicator, preds,
                    bwt=-2.0, routing_f1=f1, rb_acc=dict(lima=0.6, superni=0.3), routing_steps=1.5,
                    n_ood=dict(lima=50, superni=100))


@pytest.fixture()
def runs(tmp_path):
    return [see(tmp_path, "SEE(10%)"), see(tmp_path, "SEE(1%)", tau=0.01, f1=0.7),
            see(tmp_path, "pseudo", negatives="lima", f1=0.5),
            see(tmp_path, "semantic", indicator="semantic", sa_hits=0),
            fake_run(tmp_path, "MTL", "mtl", [[20.0, 60.0]],
                     predictions=[pred("qa", "a", "b", 9.0), pred("sa", "a", "b", 7.0)]),
            fake_run(tmp_path, "AvgSTL", "stl", [[18.0, 70.0]])]


def section(text: str, title: str) -> list[str]:
    """The table rows under the heading that starts with `title`."""
    block = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return [line for line in block.splitlines() if line.startswith("| ")
            and not line.startswith("| method")
            and not line.startswith("| tau") and not line.startswith("| indicator")]


def test_final_scores_have_a_row_per_run_with_ar_and_bwt(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "report.md")
    rows = section(text, "Final ROUGE-L per task")
    assert len(rows) == 6 and rows[0] == "| SEE(10%) | 10.00 | 50.00 | 30.00 | -2.00 |"
    assert rows[4] == "| MTL | 20.00 | 60.00 | 40.00 | – |", "one-row methods have no BWT"
    assert (tmp_path / "report.md").read_text() == text


def test_table_1_gives_ar_and_bwt_per_task_order_and_their_average(tmp_path):
    runs = [see(tmp_path, "SEE(10%)"), fake_run(tmp_path, "MTL", "mtl", [[20.0, 60.0]]),
            fake_run(tmp_path, "SEE(10%) again", "see", [[0.0], [10.0, 30.0]], bwt=-4.0,
                     tasks=["sa", "qa"])]
    rewrite(Path(runs[2]) / "eval.json", lambda r: r.update(label="SEE(10%)"))
    rows = section(report.write_report(runs, tmp_path / "r.md"), "Table 1")
    assert rows == ["| SEE(10%) | 30.00 | -2.00 | 20.00 | -4.00 | 25.00 | -3.00 |",
                    "| MTL | 40.00 | – | 40.00 | – | 40.00 | – |"], (
        "MTL does not depend on the order: repeated")


def test_the_runs_table_gives_device_and_wall_times(tmp_path):
    timed = fake_run(tmp_path, "MTL", "mtl", [[20.0, 60.0]], device="AMD EPYC (2 threads)",
                     train_seconds=5400.0, eval_seconds=90.0)
    untimed = fake_run(tmp_path, "AvgSTL", "stl", [[18.0, 70.0]])
    text = report.write_report([timed, untimed], tmp_path / "r.md")
    rows = [line for line in text.split("## Runs", 1)[1].split("\n## ", 1)[0].splitlines()
            if line.startswith("| MTL") or line.startswith("| AvgSTL")]
    assert rows[0].endswith("| AMD EPYC (2 threads) | 90.0 min | 1.5 min |")
    assert rows[1].endswith("| – | – | – |"), "results written before runs were timed"


def test_routing_f1_is_given_per_task_for_each_routed_run(tmp_path):
    per_task = dict(qa=dict(precision=1.0, recall=0.5, f1=2 / 3),
                    sa=dict(precision=0.5, recall=1.0, f1=2 / 3))
    routed = fake_run(tmp_path, "SEE(10%)", "see", [[12.0], [10.0, 50.0]], routing_f1=0.5,
                      per_task_routing=dict(per_task, sa=dict(precision=0.2, recall=1.0, f1=1 / 3)))
    sparse = fake_run(tmp_path, "SETA", "seta", [[12.0], [10.0, 50.0]], routing_f1=2 / 3,
                      per_task_routing=per_task)
    unrouted = fake_run(tmp_path, "MTL", "mtl", [[20.0, 60.0]])
    text = report.write_report([routed, sparse, unrouted], tmp_path / "r.md")
    assert section(text, "Fig. 7") == ["| SEE(10%) | 66.67 | 33.33 |", "| SETA | 66.67 | 66.67 |"]
    if report.importlib.util.find_spec("matplotlib"):  # and drawn, the routed runs side by side
        assert (tmp_path / "r-figures" / "fig7_routing_1_1.png").stat().st_size > 1000
        assert "(r-figures/fig7_routing_1_1.png)" in text


def test_out_of_distribution_queries_are_counted_by_who_answered_them(tmp_path):
    routes = dict(lima=dict(base=3, qa=2), superni=dict(sa=4))
    routed = fake_run(tmp_path, "SEE(10%)", "see", [[12.0], [10.0, 50.0]], routing_f1=0.5,
                      ood_routes=routes, n_ood=dict(lima=5, superni=4))
    earlier = fake_run(tmp_path, "SEE(1%)", "see", [[12.0], [10.0, 50.0]], routing_f1=0.5)
    text = report.write_report([routed, earlier], tmp_path / "r.md")
    rows = section(text, "Out-of-distribution queries")
    assert rows == ["| SEE(10%) | lima | 5 | 3 | 2 | 0 |", "| SEE(10%) | superni | 4 | 0 | 0 | 4 |"]
    if report.importlib.util.find_spec("matplotlib"):  # and drawn, a bar per set
        assert (tmp_path / "r-figures" / "ood_routes_1_1.png").stat().st_size > 1000
        assert "(r-figures/ood_routes_1_1.png)" in text


def scored(task, n, rouge):
    return dict(task=task, id=f"{task}-{n}", prediction="p", references=["r"], rougeL=rouge)


def test_ar_is_compared_with_see_over_the_same_queries(tmp_path):
    see_preds = [scored("qa", 0, 10.0), scored("qa", 1, 30.0), scored("sa", 0, 50.0),
                 scored("sa", 1, 50.0)]
    # +5 on each qa query, -10 on each sa query: AR -2.5 whichever queries are drawn
    mtl_preds = [scored("qa", 0, 15.0), scored("qa", 1, 35.0), scored("sa", 0, 40.0),
                 scored("sa", 1, 40.0)]
    runs = [fake_run(tmp_path, "SEE(10%)", "see", [[20.0], [20.0, 50.0]], predictions=see_preds),
            fake_run(tmp_path, "MTL", "mtl", [[25.0, 40.0]], predictions=mtl_preds),
            fake_run(tmp_path, "AvgSTL", "stl", [[20.0, 50.0]], predictions=see_preds[:2])]
    rows = section(report.write_report(runs, tmp_path / "r.md"), "AR against SEE(10%)")
    assert rows == ["| MTL | 32.50 | -2.50 | -2.50 | -2.50 |",
                    "| AvgSTL | 35.00 | – | – | – |"], "AvgSTL answered other queries"


def test_the_bootstrap_interval_holds_the_difference_and_is_reproducible():
    see_run = dict(predictions=[scored("qa", n, 20.0) for n in range(20)])
    other = dict(predictions=[scored("qa", n, 20.0 + (n % 5) * 4) for n in range(20)])
    diff, low, high = report.paired_difference(see_run, other)
    assert diff == pytest.approx(8.0) and low < diff < high
    assert report.paired_difference(see_run, other) == (diff, low, high), "a fixed seed"


def test_table_3_sets_pseudo_negatives_beside_the_same_tau_with_task_negatives(runs, tmp_path):
    rows = section(report.write_report(runs, tmp_path / "r.md"), "Table 3")
    assert rows == ["| SEE(10%) | 60.00 | 30.00 | 30.00 | 90.00 |",
                    "| pseudo | 60.00 | 30.00 | 30.00 | 50.00 |"]


def test_table_4_scores_generation_by_rouge_and_classification_by_exact_match(runs, tmp_path):
    rows = section(report.write_report(runs, tmp_path / "r.md"), "Table 4")
    # generation: qa's final ROUGE-L; classification: sa, where "Positive " matches "positive"
    assert rows == ["| added | 10% | added rows at lr 0.01 (10x the adapter's) | 10.00 | 50.00 | "
                    "90.00 |",
                    "| semantic | 10% | through the adapter (lr 0.001) | 10.00 | 0.00 | 90.00 |"], \
        "only tau values run with two indicator types"


def test_table_4_states_how_the_indicators_learned(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "r.md")
    assert "Treatment: the added indicators' rows learned at their own rate" in text
    for run in runs:  # the same runs, every indicator trained at the adapter's rate
        rewrite(Path(run) / "system.json", lambda r: r["settings"].update(indicator_lr="adapter"))
    text = report.write_report(runs, tmp_path / "r.md")
    assert "Treatment: every indicator type learned at the adapter's rate" in text
    assert "| added | 10% | added rows at the adapter's lr 0.001 |" in text


def test_the_tau_sweep_lists_see_runs_in_order_of_tau(runs, tmp_path):
    rows = section(report.write_report(runs, tmp_path / "r.md"), "Fig. 6")
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 10"], (
        "in order of tau; pseudo-negative and semantic runs stay out")


def test_the_perplexity_table_gives_medians_per_task_and_overall(runs, tmp_path):
    rows = section(report.write_report(runs, tmp_path / "r.md"), "Fig. 5")
    assert "| SEE(10%) | 3.00 | 2.00 | 2.00 |" in rows and "| MTL | 9.00 | 7.00 | 8.00 |" in rows


def test_runs_without_perplexities_are_left_out_of_fig_5(runs, tmp_path):
    lines = (Path(runs[0]) / "eval.predictions.jsonl").read_text().replace(
        ', "perplexity": 2.0', "")
    (Path(runs[0]) / "eval.predictions.jsonl").write_text(lines.replace(', "perplexity": 4.0', ""))
    rewrite(Path(runs[0]) / "eval.json", lambda r: r.update(
        predictions_sha256=digest(Path(runs[0]) / "eval.predictions.jsonl")))
    rows = section(report.write_report(runs, tmp_path / "r.md"), "Fig. 5")
    assert [r.split(" | ")[0] for r in rows] == ["| SEE(1%)", "| MTL"]


def test_plots_are_written_beside_the_report_and_linked(runs, tmp_path):
    pytest.importorskip("matplotlib")  # an optional extra, which CI installs
    text = report.write_report(runs, tmp_path / "r.md")
    for name in ("fig3_per_task_1_1.png", "fig5_perplexity_1_1.png", "fig6_tau_1_1.png"):
        assert (tmp_path / "r-figures" / name).stat().st_size > 1000
        assert f"(r-figures/{name})" in text


def test_bars_carry_their_values_so_a_zero_bar_shows():
    pytest.importorskip("matplotlib")
    fig = report.task_figure([{"label": "SEE(10%)", "scores": [[12.5, 0.0]]}], ["qa", "sa"],
                             report.bars(lambda r: r["scores"][-1]), title="Fig. 3 (x)")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["12.5", "0.0"] and ax.get_title() == "Fig. 3 (x)"


def test_without_matplotlib_the_report_says_so_and_draws_nothing(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None)
    text = report.write_report(runs, tmp_path / "r.md")
    assert ("Plots skipped: matplotlib is not installed" in text
            and not (tmp_path / "r-figures").exists())


def test_runs_of_different_settings_get_their_own_tables(runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    text = report.write_report([runs[1], see(other, "SEE(10%)", ar_scores=(1.0, 2.0))],
                               tmp_path / "r.md")
    assert text.count("## Table 1") == text.count("## Final ROUGE-L") == 1, (
        "same setting, one table")
    rewrite(other / "SEE(10%)" / "system.json", lambda r: r["settings"].update(max_train=32))
    assert report.write_report([runs[1], str(other / "SEE(10%)")],
                               tmp_path / "r.md").count("## Table 1") == 2


@pytest.mark.slow
def test_an_unevaluated_run_is_one_line_of_error(tmp_path):
    (tmp_path / "run").mkdir()
    res = subprocess.run([sys.executable, "evaluate.py", "--report", str(tmp_path / "run")],
                         cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: {tmp_path / 'run'} has no eval.json; evaluate it first "
                                  f"(without --out): python evaluate.py --run {tmp_path / 'run'}")


def test_an_eval_json_whose_method_is_not_its_systems_is_refused(tmp_path):
    from errors import UserError
    run = Path(see(tmp_path, "SEE(10%)"))
    rewrite(run / "eval.json", lambda r: r.update(method="sea"))
    with pytest.raises(UserError, match=r"eval.json: method 'sea', but .* holds a see system"):
        report.load_results([str(run)])


def test_results_edited_since_evaluation_are_refused(tmp_path):
    from errors import UserError
    run = Path(see(tmp_path, "SEE(10%)"))
    preds = run / "eval.predictions.jsonl"
    original = preds.read_text()
    preds.write_text(original.replace("2.0", "3.0", 1))
    with pytest.raises(UserError, match=r"eval.predictions.jsonl: not the file written"):
        report.load_results([str(run)])
    preds.write_text(original)
    eval_json = run / "eval.json"
    eval_json.write_text(eval_json.read_text().replace('"ar": ', '"ar": 1', 1))
    with pytest.raises(UserError, match=r"eval.json: not the file written .* damaged or edited"):
        report.load_results([str(run)])


def test_a_report_that_cannot_be_written_leaves_no_figures(runs, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from errors import UserError

    def full_disk(path, write):
        raise UserError(f"could not write {path}: No space left on device")
    monkeypatch.setattr(report, "atomic_write", full_disk)
    with pytest.raises(UserError, match="No space left"):
        report.write_report(runs, tmp_path / "out" / "r.md")
    assert not (tmp_path / "out" / "r-figures").exists()
