"""Shared by the benchmark scripts: write one section of RESULTS.md and one key of results.json."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_JSON = HERE / "results.json"
HEADER = (
    "# Benchmark results\n\nEvery figure here was written by the committed script named beside "
    "it, run on the committed code. A miss is reported as a miss.\n"
)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def write_section(key: str, title: str, intro: str, lines: list[str], data: dict[str, Any]) -> None:
    """Replace (or append) the section `key` in RESULTS.md and the entry `key` in results.json."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else HEADER
    block = f"<!-- begin {key} -->\n## {title}\n\n{intro}\n\n" + "\n".join(lines) + f"\n<!-- end {key} -->"
    pattern = re.compile(rf"<!-- begin {re.escape(key)} -->.*?<!-- end {re.escape(key)} -->", re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    RESULTS_MD.write_text(text)
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    results[key] = data
    RESULTS_JSON.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def finetune_recipe(config: Any, images: int, learning_rates: str) -> str:
    """The fine-tune recipe as the benchmark sections state it (config: a FinetuneConfig)."""
    return (
        f"1 epoch over {images} JPEG training images (held-out split excluded), SGD nesterov momentum "
        f"{config.momentum}, cosine from lr {learning_rates}, batch {config.batch_size}, weight decay "
        f"{config.weight_decay}, crop+flip, distillation T={config.temperature} weight "
        f"{config.distill_weight} from the uncompressed model"
    )
