"""Where the task data lives and how its JSON-lines files are read."""
from __future__ import annotations

import json
import os
from pathlib import Path

from errors import UserError

DATA_ENV = "SEE_DATA_DIR"
# the checkout sits beside shared/ (as in CI), so this is the fallback for tests and CI
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "superni"


def data_dir(path: str | Path | None = None) -> Path:
    """The SuperNI directory: the given path, else $SEE_DATA_DIR, else ../shared/superni."""
    d = Path(path or os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
    if not d.is_dir():
        raise UserError(f"data directory {d} not found (pass --data-dir or set {DATA_ENV})")
    return d


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines file; a malformed line is reported with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} not found")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records
