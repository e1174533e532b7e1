"""The paper's tables and figures from evaluated runs, as markdown: `python
evaluate.py --report RUN [RUN ...]`.

Reads each run's eval.json and predictions (written by `evaluate.py --run` into the run
directory) and renders Table 1 (AR, BWT per method and task order), then per task sequence: final
ROUGE-L per task, each method's AR against SEE's with a bootstrap interval, the routing metrics
and who answered the out-of-distribution queries, Table 3 (pseudo-negatives), Table 4 (indicator
types), the tau sweep (Fig. 6), per-task ROUGE-L of SEE, MTL and AvgSTL (Fig. 3), the perplexity
of SEE and MTL (Fig. 5) and MoSEs/SETA's task identification. A table compares only runs of one
setting (model, prompt, adapter, training subsample and schedule, evaluation size). Plots need
matplotlib, an optional extra.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import numpy as np

from artifacts import NUMBER, check_fields, read_json
from checkpoint import atomic_write
from data import CLASSIFICATION, ORDERS, TASKS, read_jsonl
from errors import UserError
from runs import METHODS, read_system, task_name as expert_name

TRAINING = ("model", "template", "rank", "alpha", "dropout", "targets", "max_train", "seed",
            "epochs", "batch_size", "lr", "max_source", "max_target")


def load_results(runs: list[str]) -> list[dict]:
    """Each run's eval.json, with its system.json settings and its final-stage predictions."""
    results = []
    for run in runs:
        run = Path(run)
        if not (run / "eval.json").is_file():
            raise UserError(f"{run} has no eval.json; evaluate it first (without --out): python "
                            f"evaluate.py --run {run}")
        r = read_json(run / "eval.json")
        check_fields(r, run / "eval.json", run=str, method=str, label=str, tasks=list, scores=list,
                     ar=NUMBER)
        rows = r["scores"]
        if not rows or len(rows[-1]) != len(r["tasks"]) or \
                not all(isinstance(row, list) and all(isinstance(v, (int, float)) for v in row)
                        for row in rows):
            raise UserError(f"{run / 'eval.json'}: 'scores' must be rows of numbers, the last one "
                            f"per task")
        system = read_system(run)
        if r["method"] != system["method"]:
            raise UserError(f"{run / 'eval.json'}: method {r['method']!r}, but {run} holds a "
                            f"{system['method']} system")
        r["settings"] = system["settings"]
        r["predictions"] = read_jsonl(run / "eval.predictions.jsonl")
        for n, p in enumerate(r["predictions"], 1):
            check_fields(p, f"{run / 'eval.predictions.jsonl'}:{n}", task=str, prediction=str,
                         references=list)
        results.append(r)
    return results


def setting(r: dict) -> str:
    """What runs must share to sit in one table (but the task order): model, prompt, adapter,
    training, evaluation size."""
    return json.dumps([[r["settings"].get(k) for k in TRAINING], r.get("max_eval"),
                       r.get("max_new_tokens")])


def grouped(results: list[dict], key) -> list[list[dict]]:
    groups: dict = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    return list(groups.values())


def order_name(tasks: tuple[str, ...]) -> str:
    names = [task_name(t) for t in tasks]
    return next((f"order {k}" for k, order in ORDERS.items() if order == names), ",".join(names))


def is_classification(task: str) -> bool:
    return any(task_name(task) in (a, TASKS[a]) for a in CLASSIFICATION)


def mean(values: list) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "–"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]) + "\n"


def minutes(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds / 60:.1f} min"


def pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def task_name(t: str) -> str:
    return Path(t).stem


def expert_names(tasks: list[str]) -> list[str]:
    """The names train.py gives the tasks' experts, as per_task_routing and ood_routes key them."""
    return [expert_name(t) for t in tasks]


def is_see(r: dict, negatives: str = "tasks", indicator: str = "added") -> bool:
    """A SEE run with these negatives and indicator type (default: rehearsed task queries,
    added tokens)."""
    s = r["settings"]
    return METHODS[r["method"]].routes and (s.get("negatives", "tasks"),
                                            s.get("indicator", "added")) == (negatives, indicator)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(r: dict, tasks: list[str]) -> float | None:
    """The share (%) of the final predictions on these tasks that equal a reference, case and
    spaces aside."""
    preds = [p for p in r["predictions"] if task_name(p["task"]) in tasks]
    hits = sum(normalise(p["prediction"]) in map(normalise, p["references"]) for p in preds)
    return 100 * hits / len(preds) if preds else None


def render(results: list[dict], figures: Path | None) -> str:
    """The report's markdown; figures are written into `figures` (None: no plots)."""
    out = ["# Results\n", "## Runs\n"]
    out.append(table(["method", "run", "model", "tasks", "train/task", "seed", "epochs", "batch",
                      "lr", "eval/task", "new tokens", "out-of-distribution queries", "device",
                      "train time", "eval time"],
                     [[r["label"], r["run"], r["settings"].get("model"),
                       ",".join(map(task_name, r["tasks"])),
                       r["settings"].get("max_train") or "all", r["settings"].get("seed"),
                       r["settings"].get("epochs"),
                       r["settings"].get("batch_size"), f"{r['settings'].get('lr'):g}",
                       r.get("max_eval") or "all", r.get("max_new_tokens"),
                       " + ".join(f"{n} {k}" for k, n in (r.get("n_ood") or {}).items()) or None,
                       r.get("device"), minutes(r.get("train_seconds")),
                       minutes(r.get("eval_seconds"))]
                      for r in results]))
    for n, same in enumerate(grouped(results, setting)):
        model = same[0]["settings"].get("model")
        out += table_1(same, f"setting {n + 1}: {model}, "
                             f"{same[0]['settings'].get('max_train') or 'all'} train/task")
        for m, rs in enumerate(grouped(same, lambda r: tuple(r["tasks"]))):
            tasks = [task_name(t) for t in rs[0]["tasks"]]
            title, tag = f"setting {n + 1}, {order_name(tuple(rs[0]['tasks']))}", f"{n + 1}_{m + 1}"
            out.append(f"\n## Final ROUGE-L per task ({title})\n")
            out.append(table(["method", *tasks, "AR", "BWT"],
                             [[r["label"], *r["scores"][-1], r["ar"], r["bwt"]] for r in rs]))
            out += against_see(rs, title)
            out += routing(rs, title) + routing_per_task(rs, title, rs[0]["tasks"])
            out += ood_claimants(rs, title, rs[0]["tasks"])
            out += pseudo_negatives(rs, title) + indicator_types(rs, title, rs[0]["tasks"])
            out += tau_sweep(rs, title, figures, tag) + per_task(rs, title, tasks, figures, tag)
            out += perplexity(rs, title, tasks, figures, tag) + sparse(rs, title)
    if figures is None:
        out.append("\n_Plots skipped: matplotlib is not installed (`pip install matplotlib`)._\n")
    return "\n".join(out)


def table_1(rs: list[dict], title: str) -> list[str]:
    """The paper's Table 1: a row per method, AR and BWT per task order, and their average
    over the orders. MTL and AvgSTL do not depend on the order (the paper repeats them): any
    run of the same tasks fills in."""
    orders = list(dict.fromkeys(tuple(r["tasks"]) for r in rs))
    def find(label: str, order: tuple) -> dict | None:
        exact = [r for r in rs if r["label"] == label and tuple(r["tasks"]) == order]
        alike = [r for r in rs if r["label"] == label and r["method"] in ("mtl", "stl")
                 and set(r["tasks"]) == set(order)]
        return (exact or alike or [None])[0]
    rows = []
    for label in dict.fromkeys(r["label"] for r in rs):
        cells = [find(label, o) for o in orders]
        ar, bwt = ([c and c[k] for c in cells] for k in ("ar", "bwt"))
        rows.append([label, *(v for pair in zip(ar, bwt) for v in pair), mean(ar), mean(bwt)])
    header = ["method", *(f"{order_name(o)} {m}" for o in orders for m in ("AR", "BWT")), "avg AR",
              "avg BWT"]
    return [f"\n## Table 1 ({title}): AR (Eq. 6) and BWT (Eq. 7) per task order\n",
            table(header, rows)]


def paired_difference(a: dict, b: dict, reps: int = 2000,
                      seed: int = 0) -> tuple[float, float, float] | None:
    """b's AR minus a's, and a 95% interval from a paired bootstrap: each task's eval queries
    resampled, the same draw for both runs. None where the runs' final predictions are not
    of the same queries."""
    def by_query(r: dict) -> dict:
        return {(task_name(p["task"]), p["id"]): p["rougeL"] for p in r["predictions"]
                if "rougeL" in p}
    ra, rb = by_query(a), by_query(b)
    if not ra or ra.keys() != rb.keys():
        return None
    tasks = sorted({t for t, _ in ra})
    diffs = [np.array([rb[k] - ra[k] for k in ra if k[0] == t]) for t in tasks]
    rng = np.random.default_rng(seed)
    # AR is the mean over tasks of each task's mean: resample within tasks, then average them
    boot = np.mean([d[rng.integers(0, len(d), (reps, len(d)))].mean(1) for d in diffs], axis=0)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(np.mean([d.mean() for d in diffs])), float(low), float(high)


def against_see(rs: list[dict], title: str) -> list[str]:
    """Each method's AR beside SEE's (SEE(10%) where it ran), with the difference's bootstrap
    interval: at a few dozen queries per task, whether a gap is more than the draw of queries."""
    routed = [r for r in rs if is_see(r) and r.get("routing") != "none"]
    if not routed or len(rs) < 2:
        return []
    ref = next((r for r in routed if r["settings"].get("tau") == 0.1), routed[0])
    rows = []
    for r in rs:
        if r is ref:
            continue
        diff = paired_difference(ref, r)
        rows.append([r["label"], r["ar"], *(diff or [None] * 3)])
    return [f"\n## AR against {ref['label']} ({title}): the difference (method minus "
            f"{ref['label']}) and its 95% paired bootstrap interval over the eval queries\n",
            table(["method", "AR", "difference", "2.5%", "97.5%"], rows)]


def routing(rs: list[dict], title: str) -> list[str]:
    routed = [r for r in rs if r.get("routing_f1") is not None]
    if not routed:
        return []
    return [f"\n## Routing ({title})\n\nR-F1: macro F1 of the answering expert (MoSEs/SETA: of the "
            f"task picked); "
            "RB-Acc: the share of queries of no task in the sequence that reach the base model "
            "(LIMA, held-out "
            "SuperNI tasks); steps: experts a query visits; prefills: per query, a base-model "
            "answer counted "
            "(Appendix E); exceptions: queries that met an expert emitting neither indicator "
            "(sequence / "
            "LIMA / held-out SuperNI), sent to the base model (paper Sec. 3); task id.: "
            "the share routed to their own task.\n",
            table(["method", "R-F1", "RB-LIMA", "RB-SNI", "steps", "prefills", "exceptions",
                   "task id. acc."], [[r["label"], pct(r["routing_f1"]),
                    pct((r.get("rb_acc") or {}).get("lima")),
                    pct((r.get("rb_acc") or {}).get("superni")), r.get("routing_steps"),
                    r.get("prefills"), exception_counts(r), pct(r.get("task_id_accuracy"))]
                   for r in routed])]


def routing_per_task(rs: list[dict], title: str, tasks: list[str]) -> list[str]:
    """Fig. 7: each task's routing F1 (SEE: of the expert that answered; MoSEs/SETA: of the task
    picked)."""
    routed = [r for r in rs if r.get("per_task_routing")]
    if not routed:
        return []
    names = expert_names(tasks)
    rows = []
    for r in routed:
        f1 = [pct(r["per_task_routing"].get(n, {}).get("f1")) for n in names]
        rows.append([r["label"], *f1])
    return [f"\n## Fig. 7 ({title}): routing F1 per task\n",
            table(["method", *map(task_name, tasks)], rows)]


def ood_claimants(rs: list[dict], title: str, tasks: list[str]) -> list[str]:
    """Who answered the queries of no task in the sequence (RB-Acc's): the base model, as the
    paper expects, or the expert that claimed them, oldest first."""
    routed = [r for r in rs if r.get("ood_routes")]
    if not routed:
        return []
    names = expert_names(tasks)
    rows = [[r["label"], name, r["n_ood"][name], *(counts.get(k, 0) for k in ["base", *names])]
            for r in routed for name, counts in r["ood_routes"].items()]
    return [f"\n## Out-of-distribution queries by who answered them ({title})\n",
            table(["method", "set", "queries", "base", *map(task_name, tasks)], rows)]


def exception_counts(r: dict) -> str | None:
    """"sequence / LIMA / SuperNI" exception counts of a routed SEE run (None for runs
    without them)."""
    counts = r.get("exceptions")
    if not counts:
        return None
    return " / ".join(str(counts.get(k, "-")) for k in ("tasks", "lima", "superni"))


def pseudo_negatives(rs: list[dict], title: str) -> list[str]:
    """Table 3: SEE with pseudo-negatives (LIMA queries) beside SEE with the same tau
    and indicator."""
    pseudo = [r for r in rs if METHODS[r["method"]].routes
              and r["settings"].get("negatives") == "lima"]
    chosen = []
    for p in pseudo:
        indicator, tau = p["settings"].get("indicator", "added"), p["settings"]["tau"]
        chosen += [r for r in rs if is_see(r, indicator=indicator) and r["settings"]["tau"] == tau
                   and r not in chosen] + [p]
    if not chosen:
        return []
    rows = [[r["label"], pct(r["rb_acc"].get("lima")), pct(r["rb_acc"].get("superni")), r["ar"],
             pct(r["routing_f1"])]
            for r in chosen]
    return [f"\n## Table 3 ({title}): pseudo-negatives\n\nPseudo-negatives and RB-LIMA's queries "
            f"are different "
            "LIMA queries of one distribution (the paper: Alpaca negatives, MMLU for RB-Acc), so "
            "RB-LIMA flatters "
            "the pseudo-negative rows; RB-SNI (held-out SuperNI tasks) is the fair "
            "out-of-distribution column.\n",
            table(["method", "RB-LIMA", "RB-SNI", "AR", "R-F1"], rows)]


def indicator_treatment(settings: dict) -> str:
    """How a run's indicators learned: the added rows at their own rate
    (in-vocabulary indicators have no rows of their own and learn through the
    adapter), or every type at the adapter's rate."""
    if settings.get("indicator", "added") != "added":
        return f"through the adapter (lr {settings['lr']:g})"
    rate = settings.get("indicator_lr", 1e-2)
    if rate == "adapter":
        return f"added rows at the adapter's lr {settings['lr']:g}"
    return f"added rows at lr {rate:g} ({rate / settings['lr']:g}x the adapter's)"


def indicator_types(rs: list[dict], title: str, tasks: list[str]) -> list[str]:
    """Table 4: SEE by indicator type, at each tau run with two types or more: AR
    over the generation tasks, exact-match accuracy over the classification tasks,
    and how the indicators learned."""
    see = [r for r in rs if METHODS[r["method"]].routes
           and r["settings"].get("negatives", "tasks") == "tasks"]
    kinds = {}
    for r in see:
        kinds.setdefault(r["settings"]["tau"], set()).add(r["settings"].get("indicator", "added"))
    see = [r for r in see if len(kinds[r["settings"]["tau"]]) > 1]
    if not see:
        return []
    gen = [i for i, t in enumerate(tasks) if not is_classification(t)]
    cls = [task_name(t) for t in tasks if is_classification(t)]
    rows = [[r["settings"].get("indicator", "added"), f"{100 * r['settings']['tau']:g}%",
             indicator_treatment(r["settings"]), mean([r["scores"][-1][i] for i in gen]),
             exact_match(r, cls), pct(r["routing_f1"])]
            for r in sorted(see, key=lambda r: (r["settings"]["tau"],
                                           r["settings"].get("indicator", "added")))]
    fair = all(r["settings"].get("indicator_lr") == "adapter" for r in see)
    shared = "every indicator type learned at the adapter's rate (--indicator-lr adapter)"
    own = ("the added indicators' rows learned at their own rate: the types differ in learning "
           "rate as well as in kind (run with --indicator-lr adapter for a fair comparison)")
    note = shared if fair else own
    return [f"\n## Table 4 ({title}): indicator types (generation: "
            f"{','.join(task_name(tasks[i]) for i in gen)}; classification: "
            f"{','.join(cls) or 'none'})\n",
            f"Treatment: {note}.\n",
            table(["indicator", "tau", "indicator learning", "generation AR",
                   "classification acc. (%)", "R-F1"], rows)]


def tau_sweep(rs: list[dict], title: str, figures: Path | None, tag: str) -> list[str]:
    """Fig. 6: SEE's AR and routing F1 against tau."""
    see = sorted((r for r in rs if is_see(r)), key=lambda r: r["settings"]["tau"])
    if len({r["settings"]["tau"] for r in see}) < 2:
        return []
    taus = [100 * r["settings"]["tau"] for r in see]
    out = [f"\n## Fig. 6 ({title}): the rehearsal ratio tau\n",
           table(["tau (%)", "AR", "BWT", "R-F1"],
                 [[f"{t:g}", r["ar"], r["bwt"], pct(r["routing_f1"])] for t, r in zip(taus, see)])]
    if figures is not None:
        fig = figure(8, 3)
        axes = fig.subplots(1, 2)
        for ax, (name, ys) in zip(axes, [("AR", [r["ar"] for r in see]),
                                   ("routing F1 (%)", [pct(r["routing_f1"]) for r in see])]):
            ax.plot(taus, ys, marker="o")
            ax.set(xlabel="tau (%)", ylabel=name, xscale="log" if min(taus) > 0 else "symlog")
        out.append(save(fig, figures / f"fig6_tau_{tag}.png", "Fig. 6"))
    return out


def per_task(rs: list[dict], title: str, tasks: list[str], figures: Path | None,
             tag: str) -> list[str]:
    """Fig. 3: per-task ROUGE-L of SEE, MTL and AvgSTL."""
    chosen = [r for r in rs if is_see(r) or r["method"] in ("mtl", "stl")]
    if not chosen or figures is None:  # the numbers are in the table of final scores
        return []
    fig = figure(1.2 * len(tasks) + 2, 3)
    ax = fig.subplots()
    width = 0.8 / len(chosen)
    for k, r in enumerate(chosen):
        ax.bar([i + k * width for i in range(len(tasks))], r["scores"][-1], width, label=r["label"])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set(ylabel="ROUGE-L")
    ax.legend(fontsize=7)
    return [f"\n## Fig. 3 ({title}): ROUGE-L per task\n",
            save(fig, figures / f"fig3_per_task_{tag}.png", "Fig. 3")]


def perplexity(rs: list[dict], title: str, tasks: list[str], figures: Path | None,
               tag: str) -> list[str]:
    """Fig. 5: the distribution of the references' perplexity, SEE (routed expert, after
    o_pos) vs MTL."""
    candidates = [r for r in rs if is_see(r) or r["method"] == "mtl"]
    chosen = [r for r in candidates if r["predictions"]
              and all("perplexity" in p for p in r["predictions"])]
    missing = [r["label"] for r in candidates if r not in chosen]
    if not candidates:
        return []
    def ppl(r, t=None):
        return [p["perplexity"] for p in r["predictions"] if t is None or task_name(p["task"]) == t]
    def median(values):
        return statistics.median(values) if values else None
    out = [f"\n## Fig. 5 ({title}): perplexity of the references (median per task, and over all)\n"]
    if chosen:
        out.append(table(["method", *tasks, "all"],
                         [[r["label"], *(median(ppl(r, t)) for t in tasks), median(ppl(r))]
                                                     for r in chosen]))
    if missing:
        out.append(f"\nNo perplexities for {', '.join(missing)}: evaluated before evaluate.py "
                   f"computed them; " "evaluate again with --run.\n")
    if figures is not None and chosen:
        fig = figure(1.2 * len(tasks) + 2, 3)
        ax = fig.subplots()
        width = 0.8 / len(chosen)
        for k, r in enumerate(chosen):
            box = ax.boxplot([ppl(r, t) or [float("nan")] for t in tasks],
                             positions=[i + k * width for i in range(len(tasks))],
                             widths=width * 0.9, patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(f"C{k}")
            ax.plot([], [], color=f"C{k}", label=r["label"], linewidth=6)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
        ax.set(ylabel="perplexity", yscale="log")
        ax.legend(fontsize=7)
        out.append(save(fig, figures / f"fig5_perplexity_{tag}.png", "Fig. 5"))
    return out


def sparse(rs: list[dict], title: str) -> list[str]:
    """MoSEs and SETA: task-agnostic (TaIL) vs task-given (TIL) scores, and what each stage
    trains and holds."""
    chosen = [r for r in rs if "til_ar" in r]
    if not chosen:
        return []
    return [f"\n## MoSEs and SETA ({title}): TaIL vs TIL, parameters per stage\n",
            table(["method", "TaIL AR", "TaIL BWT", "TIL AR", "TIL BWT", "task id. acc.",
                   "trainable per stage",
                   "masked weights held after each stage", "trainable share of each mask",
                   "bytes on disk per stage (a LoRA per task)", "shared-expert weights"],
                  [[r["label"], r["ar"], r["bwt"], r["til_ar"], r["til_bwt"],
                    pct(r["task_id_accuracy"]),
                    " / ".join(f"{p['trainable']:,}" for p in r["parameters"]),
                    " / ".join(f"{p['held']:,}" for p in r["parameters"]),
                    " / ".join(f"{100 * p['trainable_share']:.0f}%" for p in r["parameters"]),
                    " / ".join(f"{p['bytes']:,} ({p['lora_bytes']:,})" for p in r["parameters"]),
                    f"{r['parameters'][0].get('shared', 0):,}"]
                   for r in chosen])]


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # optional: only imported when plotting
    return Figure(figsize=(width, height), layout="tight")


def save(fig, path: Path, caption: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"\n![{caption}]({path.parent.name}/{path.name})\n"


def write_report(runs: list[str], out: str | Path) -> str:
    """Render the report of these runs to `out` (markdown), its plots beside it in <out
    stem>-figures/."""
    out = Path(out)
    figures = out.parent / f"{out.stem}-figures" if importlib.util.find_spec("matplotlib") else None
    results = load_results(runs)
    try:
        text = render(results, figures)
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"malformed results ({type(e).__name__}: {e}); evaluate the runs again "
                        f"with --run") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: p.write_text(text))
    return text


# --- the table evaluate.py prints

def print_table(results: list[dict]) -> None:
    """The paper's Table 1 layout (a row per method: AR, BWT), with the final ROUGE-L per task and,
    for SEE, routing F1, RB-Acc on LIMA and on held-out SuperNI tasks, experts visited and prefills
    per query, and queries that took the exception path (for MoSEs, R-F1 is task identification by
    key); then trainable parameters per stage, and MoSEs' TIL scores."""
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))

    def cell(v, fmt, scale=1):
        return "-" if v is None else format(scale * v, fmt)
    head = f"{'method':<22}" + "".join(f"{Path(t).stem[:7]:>8}" for t in tasks)
    print(f"\n{head}{'AR':>8}{'BWT':>8}{'R-F1':>8}{'RB-LIMA':>8}{'RB-SNI':>8}"
          f"{'steps':>7}{'prefill':>8}{'except':>7}")
    for r in results:
        final = dict(zip(r["tasks"], r["scores"][-1]))
        rb = r["rb_acc"] or {}
        exceptions = sum(r["exceptions"].values()) if r.get("exceptions") else None
        row = f"{r['label']:<22}" + "".join(f"{cell(final.get(t), '.2f'):>8}" for t in tasks)
        row += f"{r['ar']:>8.2f}{cell(r['bwt'], '.2f'):>8}{cell(r['routing_f1'], '.2f', 100):>8}"
        row += f"{cell(rb.get('lima'), '.1f', 100):>8}{cell(rb.get('superni'), '.1f', 100):>8}"
        row += f"{cell(r['routing_steps'], '.2f'):>7}{cell(r.get('prefills'), '.2f'):>8}"
        print(row + f"{cell(exceptions, 'd'):>7}")
    for r in results:
        print_parameters(r)


def print_parameters(r: dict) -> None:
    """A run's trainable parameters per stage; MoSEs/SETA: what each stage holds and stores, and
    the TIL scores beside the TaIL ones."""
    params, label = r["parameters"], r["label"]

    def listed(key: str, fmt: str = ",") -> str:
        return ", ".join(format(p[key], fmt) for p in params)
    line = f"{label}: trainable parameters per stage {listed('trainable')}"
    if "held" in params[0]:
        line += f"; weights held after each stage {listed('held')}"
        line += f"; trainable share of each task's mask {listed('trainable_share', '.0%')}"
    if params[0].get("shared"):
        line += f"; shared-expert weights {params[0]['shared']:,}"
    print(line)
    if "bytes" in params[0]:
        print(f"{label}: bytes on disk per stage {listed('bytes')} (+ training state "
              f"{listed('training_bytes')}); a LoRA per task {listed('lora_bytes')}")
    if "til_ar" in r:
        picker = "gate" if METHODS[r["method"]].gate else "keys"
        line = f"{label}: TIL AR {r['til_ar']:.2f} BWT {r['til_bwt']:.2f}; "
        line += f"TaIL AR {r['ar']:.2f} BWT {r['bwt']:.2f}; "
        line += f"TIL-TaIL gap {r['til_ar'] - r['ar']:.2f}; "
        line += f"task identification ({picker}) {100 * r['task_id_accuracy']:.1f}%"
        imprinted = r.get("imprinted_accuracy")
        if imprinted is not None:
            line += f" (gate as imprinted: {100 * imprinted:.1f}%)"
        print(line)
