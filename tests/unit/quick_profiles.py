"""A short measuring protocol for tests that measure to exercise the plumbing, not to get
repeatable figures: the bundled profiles time at least 2 s and up to 10 s per measurement,
and measure again while the machine is slow, which made the suite minutes longer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgecompress.profiles import DeviceProfile, list_profiles, load_profile, write_profile

QUICK_PROTOCOL = {"warmup": 5, "repeats": 20, "min_time_s": 0.5, "max_time_s": 0.5, "slow_retries": 0}


def quick_profile(name: str) -> DeviceProfile:
    """A bundled profile with QUICK_PROTOCOL."""
    profile = load_profile(name)
    return dataclasses.replace(profile, protocol=dataclasses.replace(profile.protocol, **QUICK_PROTOCOL))


def write_quick_profiles(home: Path) -> None:
    """Every bundled profile with QUICK_PROTOCOL into home's profiles folder, where each
    shadows the bundled profile of its name."""
    (home / "profiles").mkdir(parents=True, exist_ok=True)
    for entry in list_profiles():
        if entry.origin == "built-in":
            write_profile(quick_profile(entry.name), home / "profiles" / f"{entry.name}.yaml")
