"""The settings of one compress run: a frozen dataclass, a YAML file (--config), resumable.

`--config cfg.yaml` gives any of these (names with - or _); options given on the
command line or to `compress()` win over the file; `--save-config F` writes the
settings a run used, so the same run can be repeated or shared. The run folder keeps
them in run.json, which is what `--resume DIR` reads back.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgecompress.errors import UsageError
from edgecompress.search.agents import AGENTS
from edgecompress.search.reward import MODES, Budgets

STAGES = ("prune", "quantize")


@dataclass(frozen=True)
class RunOptions:
    """Everything that decides what a compress run does (the token is never stored)."""

    model: str
    data: str
    device: str = "host"
    weights: str | None = None
    classes: tuple[int, ...] | None = None
    latency_ms: float | None = None
    memory_mb: float | None = None
    size_kb: float | None = None
    max_accuracy_drop: float | None = None
    episodes: int = 100  # per search stage
    agent: str = "ddpg"
    seed: int = 0
    stages: tuple[str, ...] = STAGES
    finetune_epochs: int = 1  # after each stage, with distillation from the given model
    finetune_images: int | None = None  # a fixed subset of the training split per fine-tune
    finetune_lr: float = 0.01
    qat_lr: float = 1e-4  # the folded, quantized graph diverges at 1e-3 (compress/finetune.py)
    augment: bool = True  # random crops and flips while fine-tuning (off for digits: flips change them)
    torch_threads: int | None = None  # torch's threads during the run (None: as torch has it)
    heldout_images: int = 1000  # fixed held-out subset that scores candidates
    calibration_images: int = 256  # BatchNorm statistics and int8 activation ranges
    test_images: int | None = None  # the final report's test split (None: all of it)
    reward: str = "measured"  # or "flops", the comparison mode
    mode: str | None = None  # measuring mode; None: the profile's default
    remote: str | None = None  # URL of an agent on the board
    # Timing window (s) for each search candidate, at most the profile's min_time_s: the
    # search compares hundreds of candidates; the final file is verified with the
    # profile's whole protocol.
    screen_time_s: float = 0.5
    criterion: str = "l1"
    min_keep: float = 0.2
    bits: tuple[int, ...] = (2, 4, 8)
    clusters: tuple[int, ...] = (4, 16, 256)

    def __post_init__(self) -> None:
        self.budgets()  # validates the numbers
        if self.agent not in AGENTS:
            raise UsageError(f"unknown --agent {self.agent!r}; choose one of: {', '.join(AGENTS)}")
        if self.reward not in MODES:
            raise UsageError(f"unknown reward mode {self.reward!r}; choose one of: {', '.join(MODES)}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise UsageError(f"stages must be some of {', '.join(STAGES)}, not {', '.join(bad) or 'none'}")
        if self.episodes < 1:
            raise UsageError(f"--episodes must be at least 1, got {self.episodes}")
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs must be 0 or more, got {self.finetune_epochs}")
        if not 0.0 <= self.screen_time_s <= 600.0:
            raise UsageError(f"screen_time_s must be between 0 and 600 s, got {self.screen_time_s}")
        if not 0.0 < self.min_keep <= 1.0:
            raise UsageError(f"min_keep must be in (0, 1], got {self.min_keep}")
        if any(b not in (2, 4, 8) for b in self.bits):
            raise UsageError(f"bits must be chosen from 2, 4, 8 (what the file stores), got {self.bits}")

    def budgets(self) -> Budgets:
        return Budgets(self.latency_ms, self.memory_mb, self.size_kb, self.max_accuracy_drop)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "options") -> RunOptions:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise UsageError(f"{where}: unknown setting {raw_key!r}; known: {', '.join(sorted(known))}")
            if key in ("classes", "stages", "bits", "clusters") and value is not None:
                value = (
                    tuple(value)
                    if isinstance(value, (list, tuple))
                    else tuple(int(v) if key != "stages" else v.strip() for v in str(value).split(","))
                )
            values[key] = value
        missing = [k for k in ("model", "data") if k not in values]
        if missing:
            raise UsageError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(**values)
        except TypeError as err:
            raise UsageError(f"{where}: {err}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (or JSON) file, as a plain dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; check the --config path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of settings, e.g. 'episodes: 50'")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def write_config(options: RunOptions, path: str | Path) -> Path:
    """The run's settings as YAML (--save-config)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(options.to_dict(), sort_keys=False))
    return path


def merge(config: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """Config-file settings overridden by the ones given explicitly (not None)."""
    out = dict(config)
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def to_json(options: RunOptions) -> str:
    return json.dumps(options.to_dict(), indent=1)
