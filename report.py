"""The paper's tables and figures as markdown from evaluated runs (`python evaluate.py --report RUN
...`), and the table evaluate.py prints. Plots need matplotlib, an optional extra."""
from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
from pathlib import Path

import numpy as np

from artifacts import NUMBER, check_digests, check_fields, read_sealed
from checkpoint import atomic_write
from data import CLASSIFICATION, ORDERS, TASKS, read_jsonl
from errors import UserError
from runs import METHODS, read_system, task_name

OOD = ("lima", "superni")  # the sets of queries of no task in the sequence, for RB-Acc
# what runs share to sit in one table, with the evaluation size: model, prompt, adapter, training
TRAINING = ("model", "template", "rank", "alpha", "dropout", "targets", "max_train", "seed",
            "epochs", "batch_size", "lr", "max_source", "max_target")


def load_results(runs: list[str]) -> list[dict]:
    """Each run's eval.json, with its system.json settings and its final-stage predictions."""
    results = []
    for run in map(Path, runs):
        path, preds = run / "eval.json", run / "eval.predictions.jsonl"
        if not path.is_file():
            raise UserError(f"{run} has no eval.json; evaluate it first (without --out): python "
                            f"evaluate.py --run {run}")
        r = read_sealed(path)
        check_fields(r, path, run=str, method=str, label=str, tasks=list, scores=list, ar=NUMBER,
                     predictions_sha256=str)
        check_digests(run, {preds.name: r["predictions_sha256"]}, path)
        numbers = all(isinstance(row, list) and all(isinstance(v, (int, float)) for v in row)
                      for row in r["scores"])
        if not (r["scores"] and numbers and len(r["scores"][-1]) == len(r["tasks"])):
            raise UserError(f"{path}: 'scores' must be rows of numbers, the last one per task")
        system = read_system(run)
        if r["method"] != system["method"]:
            raise UserError(f"{path}: method {r['method']!r}, but {run} holds a "
                            f"{system['method']} system")
        r["settings"] = system["settings"]
        r["predictions"] = read_jsonl(preds)
        for n, p in enumerate(r["predictions"], 1):
            check_fields(p, f"{preds}:{n}", task=str, prediction=str, references=list)
        results.append(r)
    return results


def setting(r: dict) -> str:
    return json.dumps([[r["settings"][k] for k in TRAINING], r["max_eval"], r["max_new_tokens"]])


def grouped(results: list[dict], key) -> list[list[dict]]:
    return [[r for r in results if key(r) == k] for k in dict.fromkeys(map(key, results))]


def order_name(tasks: list[str]) -> str:
    names = list(map(task_name, tasks))
    return next((f"order {k}" for k, order in ORDERS.items() if order == names), ",".join(names))


def mean(values: list) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


def pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def minutes(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds / 60:.1f} min"


def table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]) + "\n"


def section(title: str, header: list[str], rows: list[list], note: str = "") -> list[str]:
    """A heading, a note under it if any, and a table; nothing without rows."""
    if not rows:
        return []
    return [f"\n## {title}\n" + (f"\n{note}\n" if note else ""), table(header, rows)]


def is_see(r: dict, negatives: str = "tasks", indicator: str = "added") -> bool:
    """A SEE run with these negatives and indicator type (default: task negatives, added tokens)."""
    kind = (r["settings"]["negatives"], r["settings"]["indicator"])
    return METHODS[r["method"]].routes and kind == (negatives, indicator)


def exact_match(r: dict, names: list[str]) -> float | None:
    """The share (%) of predictions on these tasks equal to a reference (case, spaces aside)."""
    preds = [p for p in r["predictions"] if task_name(p["task"]) in names]
    hits = sum(p["prediction"].lower().split() in [ref.lower().split() for ref in p["references"]]
               for p in preds)
    return 100 * hits / len(preds) if preds else None


def render(results: list[dict], figures: Path | None) -> str:
    """The report's markdown; figures are written into `figures` (None: no plots)."""
    out = ["# Results\n", "## Runs\n", runs_table(results)]
    for n, same in enumerate(grouped(results, setting), 1):
        s = same[0]["settings"]
        out += table_1(same, f"setting {n}: {s['model']}, {s['max_train'] or 'all'} train/task")
        for m, rs in enumerate(grouped(same, lambda r: tuple(r["tasks"])), 1):
            names = list(map(task_name, rs[0]["tasks"]))
            title, tag = f"setting {n}, {order_name(names)}", f"{n}_{m}"
            out += section(f"Final ROUGE-L per task ({title})", ["method", *names, "AR", "BWT"],
                           [[r["label"], *r["scores"][-1], r["ar"], r["bwt"]] for r in rs])
            out += against_see(rs, title) + routing(rs, title)
            out += routing_per_task(rs, title, names, figures, tag)
            out += ood_claimants(rs, title, names, figures, tag) + pseudo_negatives(rs, title)
            out += indicator_types(rs, title, names) + tau_sweep(rs, title, figures, tag)
            out += per_task(rs, title, names, figures, tag)
            out += perplexity(rs, title, names, figures, tag) + sparse(rs, title)
    if figures is None:
        out.append("\n_Plots skipped: matplotlib is not installed (`pip install matplotlib`)._\n")
    return "\n".join(out)


def runs_table(results: list[dict]) -> str:
    """A row per run: what it trained and was evaluated on, where, and how long each took."""
    rows = []
    for r in results:
        s = r["settings"]
        ood = " + ".join(f"{n} {k}" for k, n in (r["n_ood"] or {}).items()) or None
        rows.append([r["label"], r["run"], s["model"], ",".join(map(task_name, r["tasks"])),
                     s["max_train"] or "all", s["seed"], s["epochs"], s["batch_size"],
                     f"{s['lr']:g}", r["max_eval"] or "all", r["max_new_tokens"], ood, r["device"],
                     minutes(r["train_seconds"]), minutes(r["eval_seconds"])])
    return table(["method", "run", "model", "tasks", "train/task", "seed", "epochs", "batch", "lr",
                  "eval/task", "new tokens", "out-of-distribution queries", "device", "train time",
                  "eval time"], rows)


def table_1(rs: list[dict], title: str) -> list[str]:
    """The paper's Table 1: a row per method, AR and BWT per task order and their average."""
    orders = list(dict.fromkeys(tuple(r["tasks"]) for r in rs))

    def find(label: str, order: tuple) -> dict | None:
        # MTL and AvgSTL do not depend on the order (the paper repeats them): any run fills in
        runs = [r for r in rs if r["label"] == label and set(r["tasks"]) == set(order)
                and (tuple(r["tasks"]) == order or r["method"] in ("mtl", "stl"))]
        return min(runs, key=lambda r: tuple(r["tasks"]) != order, default=None)  # its own first
    rows = []
    for label in dict.fromkeys(r["label"] for r in rs):
        cells = [find(label, o) for o in orders]
        ar, bwt = ([c and c[k] for c in cells] for k in ("ar", "bwt"))
        rows.append([label, *(v for pair in zip(ar, bwt) for v in pair), mean(ar), mean(bwt)])
    header = ["method", *(f"{order_name(o)} {m}" for o in orders for m in ("AR", "BWT")), "avg AR",
              "avg BWT"]
    return section(f"Table 1 ({title}): AR (Eq. 6) and BWT (Eq. 7) per task order", header, rows)


def paired_difference(a: dict, b: dict, reps: int = 2000,
                      seed: int = 0) -> tuple[float, float, float] | None:
    """b's AR minus a's, and a 95% interval from a paired bootstrap: each task's eval queries
    resampled, the same draw for both runs. None where their final predictions differ in queries."""
    ra, rb = ({(task_name(p["task"]), p["id"]): p["rougeL"] for p in r["predictions"]
               if "rougeL" in p} for r in (a, b))
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
    """Each method's AR beside SEE's (SEE(10%) where it ran), with the gap's bootstrap interval."""
    routed = [r for r in rs if is_see(r) and r["routing"] != "none"]
    if not routed:
        return []
    ref = next((r for r in routed if r["settings"]["tau"] == 0.1), routed[0])
    rows = [[r["label"], r["ar"], *(paired_difference(ref, r) or [None] * 3)]
            for r in rs if r is not ref]
    return section(f"AR against {ref['label']} ({title}): the difference (method minus "
                   f"{ref['label']}) and its 95% paired bootstrap interval over the eval queries",
                   ["method", "AR", "difference", "2.5%", "97.5%"], rows)


def routing(rs: list[dict], title: str) -> list[str]:
    """R-F1, RB-Acc and the routing cost of each routed run (MoSEs/SETA: R-F1, task id.)."""
    rows = []
    for r in (r for r in rs if r["routing_f1"] is not None):
        rb, exceptions = r["rb_acc"] or {}, r.get("exceptions")  # routed SEE's
        counts = " / ".join(str(exceptions[k]) for k in ("tasks", *OOD)) if exceptions else None
        rows.append([r["label"], pct(r["routing_f1"]), *(pct(rb.get(k)) for k in OOD),
                     r["routing_steps"], r.get("prefills"), counts, pct(r.get("task_id_accuracy"))])
    note = ("R-F1: macro F1 of the answering expert (MoSEs/SETA: of the task picked); RB-Acc: the "
            "share of queries of no task in the sequence that reach the base model (LIMA, held-out "
            "SuperNI tasks); steps: experts a query visits; prefills: per query, a base-model "
            "answer counted (Appendix E); exceptions: queries that met an expert emitting neither "
            "indicator (sequence / LIMA / held-out SuperNI), sent to the base model (paper Sec. 3);"
            " task id.: the share routed to their own task.")
    header = ["method", "R-F1", "RB-LIMA", "RB-SNI", "steps", "prefills", "exceptions",
              "task id. acc."]
    return section(f"Routing ({title})", header, rows, note)


def routing_per_task(rs: list[dict], title: str, names: list[str], figures: Path | None,
                     tag: str) -> list[str]:
    """Fig. 7: each task's routing F1 (SEE: of the answering expert; MoSEs/SETA: of the task)."""
    routed = [r for r in rs if r["per_task_routing"]]

    def f1(r: dict) -> list[float | None]:
        return [pct(r["per_task_routing"].get(n, {}).get("f1")) for n in names]
    out = section(f"Fig. 7 ({title}): routing F1 per task", ["method", *names],
                  [[r["label"], *f1(r)] for r in routed])
    if routed and figures is not None:
        caption = f"Fig. 7 ({title}): routing F1 per task"
        fig = task_figure(routed, names, bars(f1), ylabel="routing F1 (%)", title=caption)
        out.append(save(fig, figures / f"fig7_routing_{tag}.png", "Fig. 7"))
    return out


def ood_claimants(rs: list[dict], title: str, names: list[str], figures: Path | None,
                  tag: str) -> list[str]:
    """Who answered the queries of no task in the sequence: the base model, or an expert."""
    rows = [[r["label"], name, r["n_ood"][name], *(counts.get(k, 0) for k in ["base", *names])]
            for r in rs if r["ood_routes"] for name, counts in r["ood_routes"].items()]
    caption = f"Out-of-distribution queries by who answered them ({title})"
    out = section(caption, ["method", "set", "queries", "base", *names], rows)
    if rows and figures is not None:  # a bar per set, split by who answered its queries
        fig = figure(8, 0.4 * len(rows) + 1.5)
        ax = fig.subplots()
        left = [0.0] * len(rows)
        for j, who in enumerate(["base model", *names]):
            shares = [100 * row[3 + j] / row[2] for row in rows]
            ax.barh([f"{row[0]}: {row[1]}" for row in rows], shares, left=left, label=who)
            left = [a + b for a, b in zip(left, shares)]
        ax.set(xlabel="share of the set's queries (%)", title=caption)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
        out.append(save(fig, figures / f"ood_routes_{tag}.png", "who answered"))
    return out


def pseudo_negatives(rs: list[dict], title: str) -> list[str]:
    """Table 3: SEE with pseudo-negatives (LIMA queries) beside SEE of its tau and indicator."""
    chosen = []
    for p in rs:
        s = p["settings"]
        if is_see(p, "lima", s["indicator"]):
            chosen += [r for r in rs if is_see(r, indicator=s["indicator"])
                       and r["settings"]["tau"] == s["tau"] and r not in chosen] + [p]
    rows = [[r["label"], *(pct(r["rb_acc"][k]) for k in OOD), r["ar"], pct(r["routing_f1"])]
            for r in chosen]
    note = ("Pseudo-negatives and RB-LIMA's queries are different LIMA queries of one distribution "
            "(the paper: Alpaca negatives, MMLU for RB-Acc), so RB-LIMA flatters the "
            "pseudo-negative rows; RB-SNI (held-out SuperNI tasks) is the fair out-of-distribution "
            "column.")
    return section(f"Table 3 ({title}): pseudo-negatives", ["method", "RB-LIMA", "RB-SNI", "AR",
                                                            "R-F1"], rows, note)


def indicator_treatment(s: dict) -> str:
    """How a run's indicators learned: added rows at their own or the adapter's lr, or its lr."""
    if s["indicator"] != "added":
        return f"through the adapter (lr {s['lr']:g})"
    if s["indicator_lr"] == "adapter":
        return f"added rows at the adapter's lr {s['lr']:g}"
    rate = s["indicator_lr"]
    return f"added rows at lr {rate:g} ({rate / s['lr']:g}x the adapter's)"


def indicator_types(rs: list[dict], title: str, names: list[str]) -> list[str]:
    """Table 4: SEE by indicator type at each tau run with two or more (AR; exact match)."""
    see = [r for r in rs if METHODS[r["method"]].routes and r["settings"]["negatives"] == "tasks"]
    kinds = {(r["settings"]["tau"], r["settings"]["indicator"]) for r in see}
    see = sorted((r for r in see if sum(tau == r["settings"]["tau"] for tau, _ in kinds) > 1),
                 key=lambda r: (r["settings"]["tau"], r["settings"]["indicator"]))
    cls = [n for n in names if any(n in (a, TASKS[a]) for a in CLASSIFICATION)]
    gen = [i for i, n in enumerate(names) if n not in cls]
    rows = [[r["settings"]["indicator"], f"{100 * r['settings']['tau']:g}%",
             indicator_treatment(r["settings"]), mean([r["scores"][-1][i] for i in gen]),
             exact_match(r, cls), pct(r["routing_f1"])] for r in see]
    fair = all(r["settings"]["indicator_lr"] == "adapter" for r in see)
    note = ("every indicator type learned at the adapter's rate (--indicator-lr adapter)" if fair
            else "the added indicators' rows learned at their own rate: the types differ in "
            "learning rate as well as in kind (run with --indicator-lr adapter for a fair "
            "comparison)")
    return section(f"Table 4 ({title}): indicator types (generation: "
                   f"{','.join(names[i] for i in gen)}; classification: {','.join(cls) or 'none'})",
                   ["indicator", "tau", "indicator learning", "generation AR",
                    "classification acc. (%)", "R-F1"], rows, f"Treatment: {note}.")


def tau_sweep(rs: list[dict], title: str, figures: Path | None, tag: str) -> list[str]:
    """Fig. 6: SEE's AR and routing F1 against tau."""
    see = sorted((r for r in rs if is_see(r)), key=lambda r: r["settings"]["tau"])
    if len({r["settings"]["tau"] for r in see}) < 2:
        return []
    taus = [100 * r["settings"]["tau"] for r in see]
    out = section(f"Fig. 6 ({title}): the rehearsal ratio tau", ["tau (%)", "AR", "BWT", "R-F1"],
                  [[f"{t:g}", r["ar"], r["bwt"], pct(r["routing_f1"])] for t, r in zip(taus, see)])
    if figures is not None:
        fig = figure(8, 3)
        series = {"AR": [r["ar"] for r in see],
                  "routing F1 (%)": [pct(r["routing_f1"]) for r in see]}
        for ax, (name, ys) in zip(fig.subplots(1, 2), series.items()):
            ax.plot(taus, ys, marker="o")
            ax.set(xlabel="tau (%)", ylabel=name, xscale="log" if min(taus) > 0 else "symlog")
            for t, y in zip(taus, ys):
                ax.annotate(f"{y:.1f}", (t, y), fontsize=7, textcoords="offset points",
                            xytext=(0, 4), ha="center")
        fig.suptitle(f"Fig. 6 ({title}): the rehearsal ratio tau", fontsize=9)
        out.append(save(fig, figures / f"fig6_tau_{tag}.png", "Fig. 6"))
    return out


def per_task(rs: list[dict], title: str, names: list[str], figures: Path | None,
             tag: str) -> list[str]:
    """Fig. 3: per-task ROUGE-L of SEE, MTL and AvgSTL."""
    chosen = [r for r in rs if is_see(r) or r["method"] in ("mtl", "stl")]
    if not chosen or figures is None:  # the numbers are in the table of final scores
        return []
    caption = f"Fig. 3 ({title}): ROUGE-L per task"
    fig = task_figure(chosen, names, bars(lambda r: r["scores"][-1]), ylabel="ROUGE-L",
                      title=caption)
    return [f"\n## {caption}\n",
            save(fig, figures / f"fig3_per_task_{tag}.png", "Fig. 3")]


def perplexity(rs: list[dict], title: str, names: list[str], figures: Path | None,
               tag: str) -> list[str]:
    """Fig. 5: the references' perplexity, SEE's (routed expert, after o_pos) and MTL's."""
    chosen = [r for r in rs if (is_see(r) or r["method"] == "mtl") and r["predictions"]
              and all("perplexity" in p for p in r["predictions"])]
    if not chosen:
        return []

    def ppl(r: dict, name: str | None = None) -> list[float]:
        return [p["perplexity"] for p in r["predictions"]
                if name is None or task_name(p["task"]) == name]

    def boxes(ax, k: int, r: dict, x: list[float], width: float) -> None:
        box = ax.boxplot([ppl(r, t) for t in names], positions=x, widths=width * 0.9,
                         patch_artist=True, showfliers=False, boxprops=dict(facecolor=f"C{k}"))
        box["boxes"][0].set_label(r["label"])
    out = section(f"Fig. 5 ({title}): perplexity of the references (median per task, and over all)",
                  ["method", *names, "all"],
                  [[r["label"], *(statistics.median(ppl(r, t)) for t in names),
                    statistics.median(ppl(r))] for r in chosen])
    if figures is not None:
        fig = task_figure(chosen, names, boxes, ylabel="perplexity", yscale="log",
                          title=f"Fig. 5 ({title}): perplexity of the references")
        out.append(save(fig, figures / f"fig5_perplexity_{tag}.png", "Fig. 5"))
    return out


def sparse(rs: list[dict], title: str) -> list[str]:
    """MoSEs and SETA: task-agnostic (TaIL) vs task-given (TIL) scores, and each stage's weights."""
    rows = []
    for r in (r for r in rs if "til_ar" in r):
        stages = [[f"{p['trainable']:,}", f"{p['held']:,}", f"{p['trainable_share']:.0%}",
                   f"{p['bytes']:,} ({p['lora_bytes']:,})"] for p in r["parameters"]]
        rows.append([r["label"], r["ar"], r["bwt"], r["til_ar"], r["til_bwt"],
                     pct(r["task_id_accuracy"]), *(" / ".join(c) for c in zip(*stages)),
                     f"{r['parameters'][0]['shared']:,}"])
    header = ["method", "TaIL AR", "TaIL BWT", "TIL AR", "TIL BWT", "task id. acc.",
              "trainable per stage", "masked weights held after each stage",
              "trainable share of each mask", "bytes on disk per stage (a LoRA per task)",
              "shared-expert weights"]
    return section(f"MoSEs and SETA ({title}): TaIL vs TIL, parameters per stage", header, rows)


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # optional: only imported when plotting
    return Figure(figsize=(width, height), layout="tight")


def task_figure(rs: list[dict], names: list[str], draw, **axes):
    """A group per task, in it a series per run that draw(ax, k, run, positions, width) draws."""
    fig = figure(1.2 * len(names) + 2, 3)
    ax = fig.subplots()
    width = 0.8 / len(rs)
    for k, r in enumerate(rs):
        draw(ax, k, r, [i + k * width for i in range(len(names))], width)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set(**axes)
    ax.legend(fontsize=7)
    return fig


def bars(values):
    """A task_figure draw: each run's values(run) per task as bars, each labelled with its value
    (a zero is a visible "0.0", not a missing bar)."""
    def draw(ax, k: int, r: dict, x: list[float], width: float) -> None:
        heights = [v or 0.0 for v in values(r)]
        ax.bar_label(ax.bar(x, heights, width, label=r["label"]), fmt="%.1f", fontsize=6)
    return draw


def save(fig, path: Path, caption: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"\n![{caption}]({path.parent.name}/{path.name})\n"


def write_report(runs: list[str], out: str | Path) -> str:
    """Write the report of these runs to `out` (markdown), its plots into <out stem>-figures/."""
    out = Path(out)
    figures = out.parent / f"{out.stem}-figures" if importlib.util.find_spec("matplotlib") else None
    results = load_results(runs)
    made = figures is not None and not figures.exists()
    try:
        text = render(results, figures)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda p: p.write_text(text))
        made = False
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"malformed results ({type(e).__name__}: {e}); evaluate the runs again "
                        f"with --run") from None
    finally:  # a report that failed (a full disk) leaves no figures of its own behind
        if made:
            shutil.rmtree(figures, ignore_errors=True)
    return text


# --- the table evaluate.py prints

def print_table(results: list[dict]) -> None:
    """A row per method: final ROUGE-L per task, AR, BWT, routing metrics; then its parameters."""
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))

    def cell(v, fmt, scale=1):
        return "-" if v is None else format(scale * v, fmt)
    head = f"{'method':<22}" + "".join(f"{task_name(t)[:7]:>8}" for t in tasks)
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
    """A run's trainable parameters per stage; MoSEs/SETA: what stages hold and store, TIL, TaIL."""
    params, label = r["parameters"], r["label"]

    def listed(key: str, fmt: str = ",") -> str:
        return ", ".join(format(p[key], fmt) for p in params)
    line = f"{label}: trainable parameters per stage {listed('trainable')}"
    if "til_ar" not in r:  # the rest is MoSEs/SETA's
        print(line)
        return
    line += f"; weights held after each stage {listed('held')}"
    line += f"; trainable share of each task's mask {listed('trainable_share', '.0%')}"
    if params[0]["shared"]:
        line += f"; shared-expert weights {params[0]['shared']:,}"
    print(line)
    print(f"{label}: bytes on disk per stage {listed('bytes')} (+ training state "
          f"{listed('training_bytes')}); a LoRA per task {listed('lora_bytes')}")
    picker = "gate" if METHODS[r["method"]].gate else "keys"
    line = (f"{label}: TIL AR {r['til_ar']:.2f} BWT {r['til_bwt']:.2f}; TaIL AR {r['ar']:.2f} "
            f"BWT {r['bwt']:.2f}; TIL-TaIL gap {r['til_ar'] - r['ar']:.2f}; task identification "
            f"({picker}) {100 * r['task_id_accuracy']:.1f}%")
    if r["imprinted_accuracy"] is not None:
        line += f" (gate as imprinted: {100 * r['imprinted_accuracy']:.1f}%)"
    print(line)
