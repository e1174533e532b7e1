"""The paper's tables and figures from evaluated runs, as markdown: `python evaluate.py --report RUN [RUN ...]`.

Reads each run's eval.json and predictions (written by `evaluate.py --run`) and renders Table 1
(AR, BWT per method), the routing metrics, Table 3 (pseudo-negatives), Table 4 (indicator types),
the tau sweep (Fig. 6), per-task ROUGE-L of SEE, MTL and AvgSTL (Fig. 3), the perplexity of SEE and
MTL (Fig. 5) and MoSEs/SETA's task identification. A table compares only runs of the same setting
(tasks, training subsample, seed, schedule, evaluation size). Plots need matplotlib, an optional extra.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

from checkpoint import atomic_write
from data import CLASSIFICATION
from errors import UserError

SETTING = ("max_train", "seed", "epochs", "batch_size", "lr", "max_source", "max_target")


def load_results(runs: list[str]) -> list[dict]:
    """Each run's eval.json, with its system.json settings and its final-stage predictions."""
    results = []
    for run in runs:
        run = Path(run)
        if not (run / "eval.json").is_file():
            raise UserError(f"{run} has no eval.json; evaluate it first: python evaluate.py --run {run}")
        try:
            r = json.loads((run / "eval.json").read_text())
            r["settings"] = json.loads((run / "system.json").read_text())["settings"]
            r["predictions"] = [json.loads(line) for line in (run / "eval.predictions.jsonl").read_text().splitlines()]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{run}: unreadable results ({type(e).__name__}: {e})") from None
        results.append(r)
    return results


def setting(r: dict) -> tuple:
    """What runs must share to sit in one table: tasks, training settings, evaluation size."""
    return (tuple(r["tasks"]), *(r["settings"].get(k) for k in SETTING), r.get("max_eval"), r.get("max_new_tokens"))


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]) + "\n"


def pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def task_name(t: str) -> str:
    return Path(t).stem


def is_see(r: dict, negatives: str = "tasks", indicator: str = "added") -> bool:
    """A SEE run with these negatives and indicator type (default: rehearsed task queries, added tokens)."""
    s = r["settings"]
    return r["method"] == "see" and (s.get("negatives", "tasks"), s.get("indicator", "added")) == (negatives, indicator)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(r: dict, tasks: list[str]) -> float | None:
    """The share (%) of the final predictions on these tasks that equal a reference, case and spaces aside."""
    preds = [p for p in r["predictions"] if task_name(p["task"]) in tasks]
    hits = sum(normalise(p["prediction"]) in map(normalise, p["references"]) for p in preds)
    return 100 * hits / len(preds) if preds else None


def render(results: list[dict], figures: Path | None) -> str:
    """The report's markdown; figures are written into `figures` (None: no plots)."""
    out = ["# Results\n"]
    out.append("## Runs\n")
    out.append(table(["method", "run", "tasks", "train/task", "seed", "epochs", "batch", "lr", "eval/task", "new tokens"],
                     [[r["label"], r["run"], ",".join(map(task_name, r["tasks"])), r["settings"].get("max_train") or "all",
                       r["settings"].get("seed"), r["settings"].get("epochs"), r["settings"].get("batch_size"),
                       f"{r['settings'].get('lr'):g}", r.get("max_eval") or "all", r.get("max_new_tokens")] for r in results]))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(setting(r), []).append(r)
    for n, rs in enumerate(groups.values()):
        tasks = [task_name(t) for t in rs[0]["tasks"]]
        title = f"setting {n + 1}: {','.join(tasks)}, {rs[0]['settings'].get('max_train') or 'all'} train/task"
        out.append(f"## Table 1 ({title}): final ROUGE-L per task, AR (Eq. 6), BWT (Eq. 7)\n")
        out.append(table(["method", *tasks, "AR", "BWT"],
                         [[r["label"], *r["scores"][-1], r["ar"], r["bwt"]] for r in rs]))
        routed = [r for r in rs if r["routing_f1"] is not None]
        if routed:
            out.append(f"\n## Routing ({title}): R-F1 (SEE: the answering expert; MoSEs/SETA: the task picked), "
                       "RB-Acc (queries of no task that reach the base model), mean experts visited\n")
            out.append(table(["method", "R-F1", "RB-LIMA", "RB-SNI", "steps", "task id. acc."],
                             [[r["label"], pct(r["routing_f1"]), pct((r["rb_acc"] or {}).get("lima")),
                               pct((r["rb_acc"] or {}).get("superni")), r["routing_steps"], pct(r.get("task_id_accuracy"))]
                              for r in routed]))
        out += pseudo_negatives(rs, title) + indicator_types(rs, title, tasks)
        out += tau_sweep(rs, title, figures, n) + per_task(rs, title, tasks, figures, n)
        out += perplexity(rs, title, tasks, figures, n) + sparse(rs, title)
    if figures is None:
        out.append("\n_Plots skipped: matplotlib is not installed (`pip install matplotlib`)._\n")
    return "\n".join(out)


def pseudo_negatives(rs: list[dict], title: str) -> list[str]:
    """Table 3: SEE with pseudo-negatives (LIMA queries) beside SEE with the same tau and indicator."""
    rows = []
    for p in (r for r in rs if r["method"] == "see" and r["settings"].get("negatives") == "lima"):
        indicator, tau = p["settings"].get("indicator", "added"), p["settings"]["tau"]
        same = [r for r in rs if is_see(r, indicator=indicator) and r["settings"]["tau"] == tau]
        rows += [[r["label"], pct(r["rb_acc"]["lima"]), pct(r["rb_acc"]["superni"]), r["ar"], pct(r["routing_f1"])]
                 for r in [*same, p]]
    return [f"\n## Table 3 ({title}): pseudo-negatives\n", table(["method", "RB-LIMA", "RB-SNI", "AR", "R-F1"], rows)] if rows else []


def indicator_types(rs: list[dict], title: str, tasks: list[str]) -> list[str]:
    """Table 4: SEE by indicator type (same tau and negatives): AR over generation tasks, exact-match
    accuracy over classification tasks."""
    see = [r for r in rs if r["method"] == "see" and r["settings"].get("negatives", "tasks") == "tasks"]
    if len({r["settings"].get("indicator", "added") for r in see}) < 2:
        return []
    gen = [i for i, t in enumerate(tasks) if t not in CLASSIFICATION]
    cls = [t for t in tasks if t in CLASSIFICATION]
    rows = [[r["settings"].get("indicator", "added"), f"{100 * r['settings']['tau']:g}%",
             sum(r["scores"][-1][i] for i in gen) / len(gen) if gen else None, exact_match(r, cls), pct(r["routing_f1"])]
            for r in sorted(see, key=lambda r: (r["settings"]["tau"], r["settings"].get("indicator", "added")))]
    return [f"\n## Table 4 ({title}): indicator types (generation: {','.join(tasks[i] for i in gen)}; "
            f"classification: {','.join(cls) or 'none'})\n",
            table(["indicator", "tau", "generation AR", "classification acc. (%)", "R-F1"], rows)]


def tau_sweep(rs: list[dict], title: str, figures: Path | None, n: int) -> list[str]:
    """Fig. 6: SEE's AR and routing F1 against tau."""
    see = sorted((r for r in rs if is_see(r)), key=lambda r: r["settings"]["tau"])
    if len({r["settings"]["tau"] for r in see}) < 2:
        return []
    taus = [100 * r["settings"]["tau"] for r in see]
    out = [f"\n## Fig. 6 ({title}): the rehearsal ratio tau\n",
           table(["tau (%)", "AR", "BWT", "R-F1"], [[f"{t:g}", r["ar"], r["bwt"], pct(r["routing_f1"])] for t, r in zip(taus, see)])]
    if figures is not None:
        fig = figure(8, 3)
        axes = fig.subplots(1, 2)
        for ax, (name, ys) in zip(axes, [("AR", [r["ar"] for r in see]), ("routing F1 (%)", [pct(r["routing_f1"]) for r in see])]):
            ax.plot(taus, ys, marker="o")
            ax.set(xlabel="tau (%)", ylabel=name, xscale="log")
        out.append(save(fig, figures / f"fig6_tau_{n + 1}.png", "Fig. 6"))
    return out


def per_task(rs: list[dict], title: str, tasks: list[str], figures: Path | None, n: int) -> list[str]:
    """Fig. 3: per-task ROUGE-L of SEE, MTL and AvgSTL."""
    chosen = [r for r in rs if is_see(r) or r["method"] in ("mtl", "stl")]
    if not chosen:
        return []
    out = [f"\n## Fig. 3 ({title}): ROUGE-L per task\n",
           table(["method", *tasks], [[r["label"], *r["scores"][-1]] for r in chosen])]
    if figures is not None:
        fig = figure(1.2 * len(tasks) + 2, 3)
        ax = fig.subplots()
        width = 0.8 / len(chosen)
        for k, r in enumerate(chosen):
            ax.bar([i + k * width for i in range(len(tasks))], r["scores"][-1], width, label=r["label"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
        ax.set(ylabel="ROUGE-L")
        ax.legend(fontsize=7)
        out.append(save(fig, figures / f"fig3_per_task_{n + 1}.png", "Fig. 3"))
    return out


def perplexity(rs: list[dict], title: str, tasks: list[str], figures: Path | None, n: int) -> list[str]:
    """Fig. 5: the distribution of the references' perplexity, SEE (routed expert, after o_pos) vs MTL."""
    chosen = [r for r in rs if (is_see(r) or r["method"] == "mtl") and all("perplexity" in p for p in r["predictions"])]
    if not chosen:
        return []
    def ppl(r, t=None):
        return [p["perplexity"] for p in r["predictions"] if t is None or task_name(p["task"]) == t]
    out = [f"\n## Fig. 5 ({title}): perplexity of the references (median per task, and over all)\n",
           table(["method", *tasks, "all"], [[r["label"], *(statistics.median(ppl(r, t)) for t in tasks),
                                              statistics.median(ppl(r))] for r in chosen])]
    if figures is not None:
        fig = figure(1.2 * len(tasks) + 2, 3)
        ax = fig.subplots()
        width = 0.8 / len(chosen)
        for k, r in enumerate(chosen):
            box = ax.boxplot([ppl(r, t) for t in tasks], positions=[i + k * width for i in range(len(tasks))],
                             widths=width * 0.9, patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(f"C{k}")
            ax.plot([], [], color=f"C{k}", label=r["label"], linewidth=6)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
        ax.set(ylabel="perplexity", yscale="log")
        ax.legend(fontsize=7)
        out.append(save(fig, figures / f"fig5_perplexity_{n + 1}.png", "Fig. 5"))
    return out


def sparse(rs: list[dict], title: str) -> list[str]:
    """MoSEs and SETA: task-agnostic (TaIL) vs task-given (TIL) scores, and what each stage trains and holds."""
    chosen = [r for r in rs if "til_ar" in r]
    if not chosen:
        return []
    return [f"\n## MoSEs and SETA ({title}): TaIL vs TIL, parameters per stage\n",
            table(["method", "TaIL AR", "TaIL BWT", "TIL AR", "TIL BWT", "task id. acc.", "trainable per stage",
                   "masked weights held after each stage", "shared-expert weights"],
                  [[r["label"], r["ar"], r["bwt"], r["til_ar"], r["til_bwt"], pct(r["task_id_accuracy"]),
                    " / ".join(f"{p['trainable']:,}" for p in r["parameters"]),
                    " / ".join(f"{p['stored']:,}" for p in r["parameters"]), f"{r['parameters'][0].get('shared', 0):,}"]
                   for r in chosen])]


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # optional: only imported when plotting
    return Figure(figsize=(width, height), layout="tight")


def save(fig, path: Path, caption: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"\n![{caption}]({path.parent.name}/{path.name})\n"


def write_report(runs: list[str], out: str | Path) -> str:
    """Render the report of these runs to `out` (markdown), its plots beside it in <out stem>-figures/."""
    out = Path(out)
    figures = out.parent / f"{out.stem}-figures" if importlib.util.find_spec("matplotlib") else None
    text = render(load_results(runs), figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: p.write_text(text))
    return text
