"""Scored candidates and the run's candidates.jsonl: append-only, crash-safe, resumable.

Each evaluated candidate is one JSON line, written and fsynced as soon as it is scored,
so a killed run loses at most the candidate being evaluated. A resumed run reads the
file back into a memo keyed by the candidate's decisions; the search replays its
episodes from the seed, and every candidate it meets again is taken from the memo
instead of being evaluated a second time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FIGURE_KEYS = ("accuracy", "latency_ms", "memory_mb", "size_kb", "flops")


@dataclass(frozen=True)
class Outcome:
    """What evaluating one candidate gave: held-out accuracy and its (measured) figures."""

    accuracy: float
    flops: float
    latency_ms: float | None = None
    memory_mb: float | None = None
    size_kb: float | None = None
    measurement: dict[str, Any] = field(default_factory=dict)  # mode, calibration, spread
    onnx: str | None = None  # the exported candidate, when kept
    seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FIGURE_KEYS}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Outcome:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


def digest(decisions: Mapping[str, Any]) -> str:
    """A stable key for a candidate's decisions."""
    text = json.dumps(decisions, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CandidateLog:
    """candidates.jsonl of one run: append records, read them back, memo of outcomes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _drop_partial_line(self.path)
        self.records: list[dict[str, Any]] = list(read_jsonl(self.path))

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, default=_plain, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(json.loads(line))

    def memo(self, stage: str) -> dict[str, Outcome]:
        """Outcomes already evaluated in a stage, by decisions digest."""
        return {
            r["digest"]: Outcome.from_dict(r)
            for r in self.records
            if r.get("stage") == stage and "digest" in r and "accuracy" in r
        }

    def stage(self, stage: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("stage") == stage]


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Complete JSON lines of a file; a line cut off by a crash is dropped."""
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _drop_partial_line(path: Path) -> None:
    """Cut a last line a crash left unfinished, so the next append starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to candidates.jsonl")
