"""Run options: YAML config files, precedence of given options, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecompress.errors import UsageError
from edgecompress.search.options import RunOptions, merge, read_config, write_config


def test_saved_config_reads_back_to_the_same_options(tmp_path: Path) -> None:
    options = RunOptions(
        model="resnet20", data="digits", device="embedded-arm", latency_ms=12.0, classes=(0, 3)
    )
    path = write_config(options, tmp_path / "cfg.yaml")
    assert RunOptions.from_dict(read_config(path)) == options


def test_given_options_win_over_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("model: resnet20\ndata: digits\nepisodes: 50\nlatency-ms: 9\n")
    options = RunOptions.from_dict(merge(read_config(tmp_path / "cfg.yaml"), {"episodes": 7, "seed": None}))
    assert options.episodes == 7 and options.latency_ms == 9 and options.seed == 0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"episdes": 3}, "unknown setting 'episdes'"),
        ({"agent": "ppo"}, "unknown --agent 'ppo'; choose one of: ddpg, decore, random, uniform"),
        ({"latency_ms": -1.0}, "--latency-ms must be a positive number"),
        ({"bits": (3,)}, "bits must be chosen from 2, 4, 8"),
        ({"stages": ("prune", "distill")}, "stages must be some of prune, quantize"),
        ({"screen_time_s": -0.5}, "screen_time_s must be between 0 and 600 s"),
    ],
)
def test_bad_settings_say_what_is_wrong(settings: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunOptions.from_dict({"model": "resnet20", "data": "digits", **settings})


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UsageError, match="must hold a mapping"):
        read_config(tmp_path / "cfg.yaml")
    with pytest.raises(UsageError, match="does not exist"):
        read_config(tmp_path / "missing.yaml")
