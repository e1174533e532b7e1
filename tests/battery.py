"""A battery of bad inputs, as a careful user would try them (issue 30): damaged run files, absurd
settings, writes where they must not go, refusals that leave files, a full or read-only disk.

    python tests/battery.py [--tree DIR] [--only FAMILY] [--results out.jsonl]

Each case runs a command of the tree (train.py, evaluate.py, router.py) as `python <script> ...`
would, in a forked child (torch imported once), on the tiny model, and is classed:
  clean      refused: a non-zero exit, an `error:` line, no traceback, nothing written or changed
  handled    a valid input that did what it should (exit 0, every saved tensor finite)
  traceback  a traceback, a signal or a hang
  silent     bad input (a damaged file) accepted with exit 0, or a non-finite tensor saved
  dirty      refused cleanly, but a file was added, changed or removed (a run stopped at a step
             may keep its config.json, log.jsonl and state.pt, never an expert)
--tree runs another checkout (e.g. one from before the fixes) with this same battery. The disk
cases mount small tmpfs file systems, so they need root (they are skipped otherwise)."""
import argparse
import json
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent.parent
TINY = ["--max-train", "8", "--epochs", "1", "--batch-size", "8", "--micro-batch", "8",
        "--max-source", "48", "--max-target", "6", "--tau", "0.5", "--dtype", "float32"]
EVAL = ["--max-eval", "2", "--max-new-tokens", "2", "--max-ood", "2", "--dtype", "float32"]
BAD_NUMBERS = ["-1", "0", "nan", "inf", "-inf", "1e300", "1e39", "1000000000000",
               str(2 ** 63), "abc", ""]
HUGE = ("1000000000000", str(2 ** 63))  # valid counts that would train for hours
NUMERIC = {  # flag: (method it belongs to, values skipped: valid, but run for ever)
    "--tau": ("see", ()), "--rank": ("see", ()), "--alpha": ("see", ()),
    "--dropout": ("see", ()), "--lr": ("see", ()), "--indicator-lr": ("see", ()),
    "--epochs": ("see", HUGE), "--batch-size": ("see", ()), "--micro-batch": ("see", ()),
    "--max-source": ("see", ()), "--max-target": ("see", ()), "--max-train": ("see", HUGE),
    "--seed": ("see", ()), "--save-every": ("see", ()), "--general-negatives": ("see", HUGE),
    "--experts": ("moses", ()), "--top-k": ("moses", ()), "--sparsity": ("moses", ()),
    "--pull-weight": ("moses", ()), "--shared-experts": ("seta", ()),
    "--anchor-weight": ("seta", ()), "--route-reg-weight": ("seta", ())}


def run(tree: Path, script: str, args: list, timeout: float = 300) -> tuple[int, str]:
    """`python <script> args` in the tree, forked: its exit status (-signal, or 'hang') and stderr."""
    err = tempfile.NamedTemporaryFile(delete=False)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_AS, (24 << 30, 24 << 30))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(err.fileno(), 2)
            os.chdir(tree)
            sys.path.insert(0, str(tree))
            sys.argv = [script, *map(str, args)]
            runpy.run_path(str(tree / script), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.02)
    text = Path(err.name).read_text(errors="replace")
    os.unlink(err.name)
    if status is None:
        return "hang", text
    return (os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)), text


def snapshot(root: Path) -> dict:
    """Every file's size and time, every directory's existence (a temporary file created and
    removed again is not a change)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in root.rglob("*")}


def finite(root: Path) -> bool:
    """Every tensor of every .safetensors under root finite (checked in a child: no torch threads
    in the parent, so forks stay safe)."""
    pid = os.fork()
    if pid == 0:
        from safetensors.torch import load_file
        ok = all(bool(t.float().isfinite().all()) for p in Path(root).rglob("*.safetensors")
                 for t in load_file(p).values())
        os._exit(0 if ok else 1)
    return os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 0


def kept(path: Path, out: Path | None, err: str) -> bool:
    """What a run stopped mid-training keeps (its settings, log and last checkpoint, no expert)."""
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return (out is not None and path.is_relative_to(out) and "step" in last
            and "expert" not in path.parts and (path.is_dir() or path.name in (
                "config.json", "log.jsonl", "state.pt", "system.json")))


def classify(code, err: str, bad: bool, changed: bool, out: Path | None) -> str:
    if code == "hang" or code < 0 or "Traceback" in err:
        return "traceback"
    if code == 0:
        if out is not None and out.exists() and not finite(out):
            return "silent"
        return "silent" if bad else "handled"
    if "error:" not in err:
        return "traceback"
    return "dirty" if changed else "clean"


class Battery:
    def __init__(self, tree: Path, work: Path, results):
        self.tree, self.work, self.results, self.n = tree, work, results, 0
        self.counts = Counter()

    def case(self, family: str, name: str, script: str, args: list, bad: bool = True,
             out: Path | None = None, watch: Path | None = None, timeout: float = 300) -> str:
        """Run one case; `out` is where a run it starts writes (checked for NaN, then removed),
        `watch` what must not change when it is refused (default: the whole work dir)."""
        watch = watch or self.work
        before = snapshot(watch)
        code, err = run(self.tree, script, args, timeout)
        after = snapshot(watch)
        changed = sorted(str(p.relative_to(self.work)) for p in after.keys() | before.keys()
                         if after.get(p) != before.get(p) and not kept(p, out, err))
        result = classify(code, err, bad, bool(changed), out)
        lines = [line for line in err.splitlines() if line.strip()]
        self.counts[family, result] += 1
        self.n += 1
        self.results.write(json.dumps(dict(family=family, case=name, result=result, exit=code,
                                           last=lines[-1] if lines else "",
                                           changed=changed[:3])) + "\n")
        self.results.flush()
        print(f"{self.n:4d} {family:10s} {result:9s} {name}  | {lines[-1][:100] if lines else ''}",
              flush=True)
        if out is not None and out.exists() and out.is_relative_to(self.work / "scratch"):
            shutil.rmtree(out, ignore_errors=True)
        return result


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(max(len(data), 16)))
    elif how == "edit":  # still valid JSON: the first digit changed
        i = next((i for i, c in enumerate(data) if 48 <= c <= 57), None)
        path.write_bytes(data + b" " if i is None else
                         data[:i] + bytes([48 + (data[i] - 47) % 10]) + data[i + 1:])
    else:  # flip one bit: of the tensor data's middle, or of the header's first key
        start = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else 0
        i = {"flip-data": (start + len(data)) // 2, "flip-header": 10}[how]
        path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])


def kinds(path: Path) -> tuple:
    if path.suffix == ".safetensors":
        return "flip-data", "flip-header", "truncate", "delete"
    if path.suffix == ".pt":
        return "flip-data", "truncate", "garbage", "delete"
    return "edit", "truncate", "garbage", "delete"


def build(b: Battery) -> dict:
    """The tiny model, and finished runs of SEE, MoSEs and SETA, one expert, and a run killed
    after its first checkpoint; with the train.py arguments of each."""
    tiny = b.work / "tiny"
    subprocess.run([sys.executable, "-c", f"import checkpoint; checkpoint.make_tiny({str(tiny)!r})"],
                   cwd=b.tree, check=True, capture_output=True)
    runs = {}
    for method in ("see", "moses", "seta"):
        out = b.work / "runs" / method
        runs[method] = ["--sequence", "sa,pe", "--method", method, "--model", tiny, *TINY,
                        "--out", out]
        for script, args in (("train.py", runs[method]), ("evaluate.py", ["--run", out, *EVAL])):
            code, err = run(b.tree, script, args)
            assert code == 0, err
    runs["one"] = ["--task", "sa", "--previous", "pe", "--model", tiny, *TINY,
                   "--out", b.work / "runs" / "one"]
    assert run(b.tree, "train.py", runs["one"])[0] == 0
    cut = b.work / "runs" / "cut"
    runs["cut"] = ["--task", "sa", "--previous", "pe", "--model", tiny, *TINY, "--max-train", "64",
                   "--batch-size", "2", "--micro-batch", "2", "--save-every", "2", "--out", cut]
    child = subprocess.Popen([sys.executable, "train.py", *map(str, runs["cut"])], cwd=b.tree,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (cut / "state.pt").exists() and child.poll() is None:
        time.sleep(0.01)
    child.kill()
    child.wait()
    assert (cut / "state.pt").exists() and not (cut / "expert").exists()
    return dict(tiny=tiny, **runs)


def reader(b: Battery, name: str, path: Path, runs: dict) -> tuple[str, list, bool]:
    """The command that reads this file of run `name`, and whether the damage must be refused."""
    root, scratch = b.work / "runs" / name, b.work / "scratch"
    if path.name in ("config.json", "log.jsonl") or name == "cut":
        return "train.py", runs[name], not (path.name == "state.pt")  # a lost checkpoint restarts
    if path.name.startswith("eval"):
        return "evaluate.py", ["--report", root, "--out", scratch / "report.md"], True
    if path.name == "training-state.safetensors":  # read by the next task learned from it
        method = runs[name][runs[name].index("--method") + 1]
        return "train.py", ["--task", "qa", "--method", method, "--init", path.parent, "--model",
                            runs["tiny"], *TINY, "--out", scratch / "next"], True
    if name == "one":
        return "evaluate.py", ["--expert", root / "expert", "--task", "sa", *EVAL,
                               "--out", scratch / "eval.json"], True
    return "evaluate.py", ["--run", root, *EVAL, "--out", scratch / "eval.json"], True


def damaged_files(b: Battery, runs: dict) -> None:
    """Each file of each run damaged in a copy of the run, read by what reads it."""
    copy = b.work / "copy"
    for name in ("see", "moses", "seta", "one", "cut"):
        root = b.work / "runs" / name
        for rel in sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()):
            for how in kinds(rel):
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(root, copy)
                damage(copy / rel, how)
                script, args, bad = reader(b, name, root / rel, runs)
                args = [copy / Path(a).relative_to(root) if isinstance(a, Path)
                        and a.is_relative_to(root) else a for a in args]
                b.case("damage", f"{name} {rel} {how} ({script})", script, args,
                       bad=bad or how != "delete", out=b.work / "scratch")
        shutil.rmtree(copy, ignore_errors=True)


def settings(b: Battery, runs: dict) -> None:
    """Every numeric flag of train.py at absurd values, and evaluate.py's and router.py's; a
    value may be valid (exit 0 with finite weights is handled), a refusal must be one line."""
    scratch = b.work / "scratch"
    for flag, (method, forever) in NUMERIC.items():
        for value in BAD_NUMBERS:
            if value in forever:
                continue
            task = (["--task", "sa", "--previous", "pe"] if method == "see"
                    else ["--sequence", "sa,pe"])
            b.case("settings", f"train.py {flag} {value!r}", "train.py",
                   [*task, "--method", method, "--model", runs["tiny"], *TINY, flag, value,
                    "--out", scratch / "run"], bad=False, out=scratch, timeout=180)
    see = b.work / "runs" / "see"
    for flag in ("--max-eval", "--max-ood", "--max-new-tokens", "--batch-size", "--max-source"):
        for value in (v for v in BAD_NUMBERS if flag != "--max-eval" or v not in HUGE):
            b.case("settings", f"evaluate.py {flag} {value!r}", "evaluate.py",
                   ["--run", see, *EVAL, flag, value, "--out", scratch / "eval.json"], bad=False,
                   out=scratch, timeout=120)
    for flag in ("--index", "--max-new-tokens"):
        for value in BAD_NUMBERS:
            b.case("settings", f"router.py {flag} {value!r}", "router.py",
                   ["--run", see, "--task", "sa", "--max-new-tokens", "2", flag, value],
                   bad=False, timeout=120)


def write_targets(b: Battery, runs: dict) -> None:
    """--out where a run or a result must not go, and results of other settings."""
    see, one, tiny = b.work / "runs" / "see", b.work / "runs" / "one", runs["tiny"]
    stage = next(p for p in sorted(see.iterdir()) if p.is_dir())
    train = ["--task", "qa", "--model", tiny, *TINY]
    for target in (stage / "expert" / "new", stage / "expert", stage, see, one / "expert", one,
                   see / "system.json", stage / "config.json", tiny, tiny / "new"):
        b.case("writes", f"train.py --out {target.relative_to(b.work)}", "train.py",
               [*train, "--out", target], bad=target != tiny / "new")  # a new dir: allowed
    for target in (see / "system.json", stage / "expert" / "expert.json",
                   stage / "expert" / "adapter_model.safetensors", stage / "config.json",
                   stage / "log.jsonl", see, stage, tiny / "config.json"):
        b.case("writes", f"evaluate.py --run --out {target.relative_to(b.work)}", "evaluate.py",
               ["--run", see, *EVAL, "--out", target])
        b.case("writes", f"evaluate.py --expert --out {target.relative_to(b.work)}",
               "evaluate.py", ["--expert", one / "expert", "--task", "sa", *EVAL,
                               "--out", target])
    other_data = b.work / "superni-copy"
    shutil.copytree(os.environ["SEE_DATA_DIR"], other_data, dirs_exist_ok=True)
    for change in (["--dtype", "bfloat16"], ["--data-dir", other_data], ["--max-eval", "3"],
                   ["--max-new-tokens", "3"], ["--template", "plain"], ["--max-source", "40"],
                   ["--max-ood", "3"]):
        b.case("writes", f"evaluate.py --run (over its eval.json) {change[0]}", "evaluate.py",
               ["--run", see, *EVAL, *change])
    shutil.rmtree(other_data)


def refusals(b: Battery, runs: dict) -> None:
    """Inputs that must be refused before anything is written."""
    tiny, scratch, data = runs["tiny"], b.work / "scratch", b.work / "data"
    data.mkdir(exist_ok=True)
    files = {"bad-line.jsonl": '{"input": "a", "output": "b"}\n{"input": "a", \n',
             "no-output.jsonl": '{"input": "a"}\n',
             "list-output.jsonl": '{"input": "a", "output": []}\n',
             "number-output.jsonl": '{"input": "a", "output": 3}\n',
             "number-input.jsonl": '{"input": 3, "output": "b"}\n',
             "surrogate.jsonl": '{"input": "a\\ud800", "output": "b"}\n',
             "empty.jsonl": "", "blank.jsonl": "\n\n", "array.jsonl": '[1, 2]\n',
             "surrogate.json": '{"Definition": ["a\\ud800"], "Instances": []}',
             "no-instances.json": '{"Definition": ["a"]}', "list.json": "[]",
             "truncated.json": '{"Definition": ["a"], "Inst'}
    for name, text in files.items():
        (data / name).write_text(text)
    (data / "latin1.jsonl").write_bytes(b'{"input": "caf\xe9", "output": "b"}\n')
    (data / "latin1.json").write_bytes(b'{"Definition": ["caf\xe9"], "Instances": []}')
    tasks = [*(str(data / f) for f in sorted(os.listdir(data))), "foo", "QA", "qa,", "missing.json",
             str(data / "missing.jsonl"), str(data), ""]
    for task in tasks:
        b.case("refusals", f"train.py --task {Path(task).name or task!r}", "train.py",
               ["--task", task, "--model", tiny, *TINY, "--out", scratch / "run"])
    for sequence in ("qa,foo", "qa, sa", "QA", "qa,,sa", "qa,qa", "", ",", f"qa,{data}/empty.jsonl",
                     f"qa,{data}/bad-line.jsonl", "qa,sa,missing.json"):
        b.case("refusals", f"train.py --sequence {sequence.replace(str(data), 'data')!r}",
               "train.py", ["--sequence", sequence, "--model", tiny, *TINY, "--out",
                            scratch / "run"])
    for args in (["--max-source", "1"], ["--max-source", "2"], ["--max-target", "1"],
                 ["--previous", "foo"], ["--previous", "sa,sa"], ["--init", scratch / "none"],
                 ["--init", tiny], ["--model", scratch / "none"], ["--model", data],
                 ["--data-dir", scratch / "none"], ["--data-dir", data], ["--targets", "nope"],
                 ["--targets", ""], ["--method", "see", "--negatives", "lima", "--general-negatives",
                                     "3"], ["--method", "mtl", "--general-negatives", "3"]):
        for task in (["--task", "sa"], ["--sequence", "sa,pe"]):
            b.case("refusals", f"train.py {task[0]} {' '.join(map(str, args))}".replace(
                str(b.work), "W"), "train.py", [*task, "--model", tiny, *TINY, *args, "--out",
                                                 scratch / "run"], out=scratch)


def edited(b: Battery, runs: dict) -> None:
    """Valid JSON with values no run writes, read by evaluate.py."""
    copy = b.work / "copy"
    edits = {"adapter_config.json": [("r", 10 ** 12), ("r", 0), ("r", -1), ("r", "8"),
                                     ("lora_alpha", float("nan")), ("target_modules", ["nope"]),
                                     ("target_modules", [])],
             "expert.json": [("name", ""), ("name", None), ("indicator", "nope"), ("task", ""),
                             ("tokens", [])],
             "system.json": [("experts", []), ("experts", ["nowhere"]), ("method", "nope"),
                             ("tasks", ["sa"]), ("model", "")]}
    for name, run_name in (("adapter_config.json", "one"), ("expert.json", "one"),
                           ("adapter_config.json", "see"), ("expert.json", "see"),
                           ("system.json", "see")):
        root = b.work / "runs" / run_name
        path = next(p for p in sorted(root.rglob(name)))
        for key, value in edits[name]:
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(root, copy)
            target = copy / path.relative_to(root)
            content = json.loads(target.read_text())
            if value is None:
                content.pop(key, None)
            else:
                content[key] = value
            target.write_text(json.dumps(content))
            args = (["--run", copy] if run_name == "see" else
                    ["--expert", copy / "expert", "--task", "sa"])
            b.case("edited", f"{run_name} {path.relative_to(root)} {key}={value!r}",
                   "evaluate.py", [*args, *EVAL, "--out", b.work / "scratch" / "eval.json"],
                   out=b.work / "scratch")
    shutil.rmtree(copy, ignore_errors=True)


def leftovers(root: Path) -> bool:
    """A temporary left behind, or a file that is not whole (JSON that does not parse)."""
    for p in root.rglob("*"):
        if p.name.startswith(".") or p.name.endswith(".tmp"):
            return True
        if p.suffix == ".json" and p.is_file():
            try:
                json.loads(p.read_text())
            except ValueError:
                return True
    return False


def disks(b: Battery, runs: dict) -> None:
    """Training and evaluating into a small full or a read-only file system (tmpfs, as root)."""
    mount = b.work / "mnt"
    mount.mkdir(exist_ok=True)
    see, tiny = b.work / "runs" / "see", runs["tiny"]
    commands = {"train.py --task": ("train.py", ["--task", "sa", "--model", tiny, *TINY,
                                                 "--out", mount / "run"]),
                "train.py --sequence": ("train.py", ["--sequence", "sa,pe", "--model", tiny,
                                                     *TINY, "--out", mount / "run"]),
                "evaluate.py --run": ("evaluate.py", ["--run", see, *EVAL, "--out",
                                                      mount / "eval.json"]),
                "evaluate.py --report": ("evaluate.py", ["--report", see, "--out",
                                                         mount / "report.md"])}
    for size in ("ro", "4k", "16k", "64k", "256k", "1m"):
        for name, (script, args) in commands.items():
            options = "ro,size=1m" if size == "ro" else f"size={size}"
            if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", mount],
                              capture_output=True).returncode:
                print("disk cases skipped: mounting tmpfs needs root")
                return
            try:  # a result is all or nothing; a run may keep whole files to resume from
                result = b.case("disk", f"{name} into {size}", script, args, bad=False,
                                watch=b.work / "runs" if script == "train.py" else mount)
                if result in ("clean", "handled") and leftovers(mount):
                    b.counts["disk", result] -= 1
                    b.counts["disk", "dirty"] += 1
                    print("     ^ counted dirty: a temporary or torn file left")
            finally:
                subprocess.run(["umount", mount], check=True)


FAMILIES = {"damage": damaged_files, "settings": settings, "writes": write_targets,
            "refusals": refusals, "edited": edited, "disk": disks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=HERE, help="checkout whose commands to try")
    parser.add_argument("--only", nargs="*", choices=list(FAMILIES), help="families to run")
    parser.add_argument("--results", type=Path, default=Path("battery.jsonl"),
                        help="one JSON line per case (default: battery.jsonl)")
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("SEE_DATA_DIR", str(HERE.parent / "shared" / "superni"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # imported once here, so each forked case starts fast
    work = args.work or Path(tempfile.mkdtemp(prefix="battery-"))
    with args.results.open("w") as results:
        b = Battery(args.tree.resolve(), work.resolve(), results)
        runs = build(b)
        for name in args.only or FAMILIES:
            FAMILIES[name](b, runs)
    classes = ("clean", "handled", "traceback", "silent", "dirty")
    print(f"\n{'family':10s}" + "".join(f"{c:>10s}" for c in classes) + f"{'cases':>8s}")
    for family in dict.fromkeys(f for f, _ in b.counts):
        row = [b.counts[family, c] for c in classes]
        print(f"{family:10s}" + "".join(f"{n:10d}" for n in row) + f"{sum(row):8d}")
    print(f"{'all':10s}" + "".join(f"{sum(n for (_, c), n in b.counts.items() if c == k):10d}"
                                   for k in classes) + f"{b.n:8d}")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
