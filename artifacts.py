"""Reading the files of runs and checkpoints: a missing, unreadable or malformed file is one
UserError naming it and what is wrong, never a traceback. Their loaders check what fields mean."""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from errors import UserError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror})") from None


def read_json(path: str | Path, kind: type = dict):
    """A JSON file's value, which must be a `kind` (an object unless told)."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(value, kind):
        raise UserError(f"{path}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    check_unicode(value, path)
    return value


def check_unicode(value, where: str | Path) -> None:
    """Refuse a JSON value holding a lone surrogate (JSON may escape one; no tokenizer encodes it)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: holds a lone surrogate (not valid Unicode)") from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


NUMBER = "number"  # an int or a float; in check_fields' `types`


def check_fields(record: dict, path: str | Path, **types) -> None:
    """Refuse a record lacking a field of `types` or holding one of another type: a type, a tuple of
    types, or NUMBER (a finite int or float). JSON's true/false do not count as numbers."""
    for key, kind in types.items():
        if key not in record:
            raise UserError(f"{path}: no field {key!r}")
        value = record[key]
        if kind == NUMBER:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
        else:
            ok = isinstance(value, kind)
        if not ok or isinstance(value, bool) and kind in (int, float, NUMBER):
            want = "a finite number" if kind == NUMBER else getattr(kind, "__name__", str(kind))
            raise UserError(f"{path}: field {key!r} is {value!r}, expected {want}")


def inside(root: str | Path, relative: str, path: str | Path) -> Path:
    """root/relative, refused (naming the file `path` that lists it) unless it stays inside root."""
    target = Path(root, relative)
    if Path(relative).is_absolute() or not target.resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"{path}: {relative!r} points outside {root}")
    return target


def digest(value: Path | dict | list | torch.Tensor | object) -> str:
    """sha256 of a file, or of a value (its tensors' bytes, other values' text): checked on read."""
    h = hashlib.sha256()
    if isinstance(value, Path):
        h.update(value.read_bytes())
    elif isinstance(value, torch.Tensor):
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (dict, list, tuple)):
        items = enumerate(value)
        if isinstance(value, dict):
            items = sorted(value.items(), key=lambda item: str(item[0]))
        for key, v in items:
            h.update(f"{key}:{digest(v)}".encode())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def seal(record: dict) -> dict:
    """`record` with its contents' sha256, by which read_sealed tells one damaged or edited."""
    return {**record, "sha256": digest(record)}


def read_sealed(path: str | Path) -> dict:
    record = read_json(path)
    if record.pop("sha256", None) != digest(record):
        raise UserError(f"{path}: not the file written (its contents differ from its sha256 "
                        f"record): damaged or edited")
    return record


def check_digests(directory: Path, digests: dict, where: Path, optional: tuple = ()) -> None:
    """Refuse files of `directory` whose sha256 is not `where`'s record (`optional` ones may go)."""
    for name, recorded in digests.items():
        path = inside(directory, name, where)
        if name in optional and not path.exists():
            continue
        if not path.is_file() or digest(path) != recorded:
            raise UserError(f"{path}: not the file written (missing, or its sha256 differs from "
                            f"{where}'s record): damaged or replaced")


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, a result path whose directory cannot be created or written to."""
    if Path(path).is_dir():
        raise UserError(f"cannot write {path}: it is a directory; name a file")
    parent = Path(path).absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path}: {existing} is not writable ({e.strerror})") from None
