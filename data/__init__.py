"""The SuperNI tasks of the SEE paper: where they live, how they are read, the paper's task orders,
and rehearsal sampling (RandSel) from earlier tasks."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from artifacts import check_unicode, read_json, read_text
from errors import UserError

DATA_ENV = "SEE_DATA_DIR"
# the checkout sits beside shared/ (as in CI), so this is the fallback for tests and CI
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "superni"

TASKS = {  # the paper's Table 8
    "qa": "task024_cosmosqa_answer_generation",
    "qg": "task074_squad1.1_question_generation",
    "sa": "task1312_amazonreview_polarity_classification",
    "sum": "task511_reddit_tifu_long_text_summarization",
    "trans": "task1219_ted_translation_en_es",
    "dsg": "task574_air_dialogue_sentence_generation",
    "expl": "task192_hotpotqa_sentence_generation",
    "para": "task177_para-nmt_paraphrasing",
    "pe": "task064_all_elements_except_first_i",
    "pos": "task346_hybridqa_classification",
}
CLASSIFICATION = ("sa", "pos")  # the paper's classification tasks (Fig. 3, Table 4)
XLINGUAL = ("trans",)  # references not English (trans: to Spanish): SuperNI's xlingual scoring
ORDERS = {  # the paper's Table 5 (orders 1-3 of five tasks) and its 10-task order
    "1": ["qa", "qg", "sa", "sum", "trans"],
    "2": ["trans", "sa", "qa", "sum", "qg"],
    "3": ["sum", "qg", "trans", "qa", "sa"],
    "10": ["qa", "qg", "sa", "sum", "trans", "dsg", "expl", "para", "pe", "pos"],
}
SPLITS = ("train", "eval", "extra", "train.smp01", "train.smp005", "train.smp001")
PAPER_TRAIN_SIZE = 2000  # the paper's training set per task; qg and sum ship only their samples
# the fixed RandSel samples the SSR line of work (which SEE follows) rehearses: 10%, 5%, 1% of train
SAMPLE_SPLITS = {0.1: "train.smp01", 0.05: "train.smp005", 0.01: "train.smp001"}
TASK_FILE_EVAL = 100  # official task files have no splits: the first 100 evaluate, as SuperNI's
OOD_EVAL = 200  # LIMA's first 200 queries test OOD routing; pseudo-negatives come from the rest


@dataclass
class Example:
    id: str
    query: str  # what the model is asked: the task definition, a blank line, the instance input
    outputs: list[str]  # reference responses (SuperNI scores the best match)


def data_dir(path: str | Path | None = None) -> Path:
    """The SuperNI directory: the given path, else $SEE_DATA_DIR, else ../shared/superni."""
    d = Path(path or os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
    if not d.is_dir():
        raise UserError(f"data directory {d} not found (pass --data-dir or set {DATA_ENV})")
    return d


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines file; a malformed line is reported as file:line."""
    return [record for _, record in _numbered_jsonl(path)]


def _numbered_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    if not Path(path).is_file():
        raise UserError(f"data file {path} not found")
    records = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        check_unicode(record, f"{path}:{n}")
        records.append((n, record))
    return records


def load_task(task: str, split: str = "train",
              directory: str | Path | None = None) -> list[Example]:
    """A task's examples: an abbreviation from TASKS read from `<dir>/<task>.<split>.jsonl`, or the
    path of an official Super-NaturalInstructions task file (`Definition`, `Instances`)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if task.endswith(".json"):
        return load_task_file(task, split)
    if task.endswith(".jsonl"):
        return load_own_task(task, split)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; known: {', '.join(TASKS)}, or the path of a "
                        f"SuperNI task .json file or of your own .jsonl")
    path = data_dir(directory) / f"{task}.{split}.jsonl"
    if split == "train" and not path.exists() and path.with_suffix(".smp01.jsonl").exists():
        # qg and sum ship only their 10% sample; say so rather than fail
        print(f"note: {path.name} not found, training on {path.with_suffix('.smp01.jsonl').name}")
        path = path.with_suffix(".smp01.jsonl")
    return [Example(str(r.get("id", f"{task}-{n}")), r["full_prompt"],
                    references(r, "full_prompt", f"{path}:{n}")) for n, r in _numbered_jsonl(path)]


def references(record: dict, query: str, where: str) -> list[str]:
    """A record's 'output' (a string or a list of them) as a list; its `query` must be a string."""
    output = record.get("output")
    outputs = [output] if isinstance(output, str) else output
    if not isinstance(record.get(query), str) or not isinstance(outputs, list) or not outputs \
            or not all(isinstance(o, str) for o in outputs):
        raise UserError(f"{where}: need a string {query!r} and an 'output' string (or list of "
                        f"strings)")
    return outputs


def load_own_task(path: str | Path, split: str) -> list[Example]:
    """Your own task: a JSONL file, one {"input": ..., "output": ...} a line (output: a reference or
    a list of them), with an optional "definition" put before the input as SuperNI's are. Its last
    tenth (at least one line) is the eval split; every other split is the rest."""
    examples = []
    for n, r in _numbered_jsonl(path):
        outputs = references(r, "input", f"{path}:{n}")
        if not isinstance(r.get("definition", ""), str):
            raise UserError(f"{path}:{n}: 'definition', if given, must be a string")
        query = f"{r['definition']}\n\n{r['input']}" if r.get("definition") else r["input"]
        examples.append(Example(f"{Path(path).stem}-{n}", query, outputs))
    cut = len(examples) - max(1, len(examples) // 10)
    return examples[cut:] if split == "eval" else examples[:cut]


def load_task_file(path: str | Path, split: str) -> list[Example]:
    """Instances of an official SuperNI task file; the query is Definition + blank line + input."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} not found")
    try:
        task = read_json(path)
        definition = task["Definition"]
        definition = definition[0] if isinstance(definition, list) else definition
        examples = [Example(str(i["id"]), f"{definition}\n\n{i['input']}",
                            [i["output"]] if isinstance(i["output"], str) else list(i["output"]))
                    for i in task["Instances"]]
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}: not a SuperNI task file (need 'Definition' and 'Instances' "
                        f"with 'id', 'input', 'output'): {type(e).__name__} {e}") from None
    empty = next((ex.id for ex in examples if not ex.outputs
                  or not all(isinstance(o, str) for o in ex.outputs)), None)
    if empty is not None:
        raise UserError(f"{path}: instance {empty} has no reference output strings")
    return examples[:TASK_FILE_EVAL] if split == "eval" else examples[TASK_FILE_EVAL:]


def subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """n examples drawn reproducibly without replacement (all of them if n is None or too large)."""
    if n is None or n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, n)


def rehearsal(previous: dict[str, list[Example]], tau: float, seed: int,
              sizes: dict[str, int] | None = None) -> list[Example]:
    """RandSel(tau): tau (runs.py checks it is in [0, 1]) of each earlier task's training examples,
    at least one, of `sizes[task]` where given (a larger training set), as many as there are. Each
    task is drawn with its own seed, so adding a task never changes what the others draw."""
    if tau == 0:
        return []
    drawn = []
    for name, examples in previous.items():
        k = max(1, round(tau * (sizes or {}).get(name, len(examples))))
        drawn += random.Random(f"{seed}/{name}").sample(examples, min(k, len(examples)))
    return drawn


def paper_size(task: str, shipped: int, directory: str | Path | None = None) -> int:
    """A training set's size: the paper's (PAPER_TRAIN_SIZE) where a task of it ships only samples,
    else the `shipped` examples."""
    samples_only = task in TASKS and not (data_dir(directory) / f"{task}.train.jsonl").is_file()
    return PAPER_TRAIN_SIZE if samples_only else shipped


def rehearsal_sets(tasks: list[str], tau: float, seed: int, max_train: int | None = None,
                   directory: str | Path | None = None) -> tuple[list[Example], list[str]]:
    """What each earlier task rehearses, and a line per task saying where it came from: its fixed
    sample file for tau (SAMPLE_SPLITS) on full training sets, as the SSR line of work draws
    RandSel; else tau of its training set (cut to max_train; qg, sum sized as PAPER_TRAIN_SIZE)."""
    drawn, sources = [], []
    for task in tasks:
        split = SAMPLE_SPLITS.get(tau)
        fixed = split is not None and task in TASKS and max_train is None
        if fixed and (data_dir(directory) / f"{task}.{split}.jsonl").is_file():
            chosen = load_task(task, split, directory)
            sources.append(f"{task}: {len(chosen)} from {task}.{split}.jsonl")
        else:
            examples = subsample(load_task(task, "train", directory), max_train, seed)
            size = paper_size(task, len(examples), directory)
            size = min(size, max_train) if max_train else size
            chosen = rehearsal({task: examples}, tau, seed, {task: size})
            asked = max(1, round(tau * size)) if tau else 0
            short = f" ({asked} asked, only {len(examples)} ship)" if asked > len(examples) else ""
            sources.append(f"{task}: {len(chosen)} of {len(examples)} drawn at random{short}")
        drawn += chosen
    return drawn, sources


def load_ood(path: str | Path | None = None, directory: str | Path | None = None,
             split: str = "eval") -> list[Example]:
    """LIMA's instructions, queries of no task (default: lima.jsonl beside the SuperNI directory):
    the first OOD_EVAL ("eval") for RB-Acc, the rest ("train") as pseudo-negatives (Table 3)."""
    path = Path(path) if path else data_dir(directory).parent / "lima.jsonl"
    examples = []
    for n, r in _numbered_jsonl(path):
        if not isinstance(r.get("instruction"), str):
            raise UserError(f"{path}:{n}: need a string 'instruction'")
        query = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        examples.append(Example(f"ood-{n}", query, [r.get("output") or ""]))
    return examples[:OOD_EVAL] if split == "eval" else examples[OOD_EVAL:]
