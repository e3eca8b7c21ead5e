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
    return f"{cpu}{_cpu_features()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def _cpu_features() -> str:
    """What decides onnxruntime's kernels and this machine's noise: SIMD width, VNNI, L3 size."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    rows = [line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")]
    flags = rows[0] if rows else []
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    vnni = "VNNI" if {"avx512_vnni", "avx_vnni"} & set(flags) else "no VNNI"
    l3 = ""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        l3 = f", L3 {size.replace('K', ' KiB')}"
    except OSError:
        pass
    return f" ({simd}, {vnni}{l3})"


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
