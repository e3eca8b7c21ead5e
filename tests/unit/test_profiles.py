"""Device profiles: the bundled ones, strict validation, lookup and shadowing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from edgecompress.errors import ProfileError
from edgecompress.profiles import (
    DeviceProfile,
    list_profiles,
    load_profile,
    profile_from_dict,
    write_profile,
)

BUILT_IN = ("host", "embedded-arm", "mobile-cpu", "satellite-board")


@pytest.fixture
def good() -> dict:
    return load_profile("embedded-arm").to_dict()


def _write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_profiles_load_and_say_what_they_stand_for(name: str, home: Path) -> None:
    profile = load_profile(name)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == name
    assert profile.cpu.arch in ("aarch64", "x86_64")  # all bundled boards are 64-bit
    assert profile.session.intra_op_threads <= profile.cpu.cores
    assert profile.budgets.model_memory_mb <= profile.budgets.ram_mb
    assert profile.calibration.note
    assert profile.measure.default_mode == "emulated-on-host"
    assert profile.path is not None and profile.path.name == f"{name}.yaml"
    with pytest.raises(AttributeError):
        profile.name = "other"  # type: ignore[misc]


def test_built_in_hardware_classes(home: Path) -> None:
    names = ("embedded-arm", "mobile-cpu", "satellite-board", "host")
    arm, phone, sat, host = (load_profile(n) for n in names)
    assert (arm.cpu.core, arm.cpu.cores, arm.budgets.ram_mb) == ("cortex-a53", 4, 1024)
    assert 1.2 <= arm.cpu.clock_ghz <= 1.4
    assert phone.cpu.core == "cortex-a76" and phone.int8_activations == "int8"
    assert sat.cpu.core == "cortex-a53" and sat.cpu.cores <= 2
    assert sat.budgets.storage_kb < arm.budgets.storage_kb  # the uplink makes bytes dear
    assert host.cpu.core == "host" and host.int8_activations == "uint8"
    for p in (arm, phone, sat):
        assert p.calibration.source == "declared"
        assert "estimate" in p.calibration.note


def _expect_error(tmp_path: Path, data: object, key: str) -> str:
    path = _write(tmp_path / "bad.yaml", data)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message and f"'{key}'" in message, message
    assert "\n" not in message
    return message


def _set(data: dict, dotted: str, value: object) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def _drop(data: dict, dotted: str) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    return data


@pytest.mark.parametrize(
    "key",
    ["name", "stands_for", "cpu", "cpu.core", "cpu.cores", "cpu.clock_ghz", "cpu.memory_bandwidth_gbps",
     "session.intra_op_threads", "kernels.channel_multiple", "kernels.int8_activations",
     "budgets.ram_mb", "budgets.storage_kb", "protocol.repeats", "measure.default_mode",
     "calibration.latency_scale", "calibration.source", "calibration.note"],
)  # fmt: skip
def test_missing_key_is_named(tmp_path: Path, good: dict, key: str) -> None:
    assert "is missing" in _expect_error(tmp_path, _drop(good, key), key)


@pytest.mark.parametrize("key", ["colour", "cpu.turbo", "budgets.flash_mb", "calibration.when"])
def test_unknown_key_is_named(tmp_path: Path, good: dict, key: str) -> None:
    assert "not a known key" in _expect_error(tmp_path, _set(good, key, 1), key)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cpu.cores", "four"),
        ("cpu.cores", 4.0),
        ("cpu.cores", True),
        ("cpu.clock_ghz", "1.2GHz"),
        ("session.intra_op_threads", None),
        ("budgets.ram_mb", [1024]),
        ("protocol.warmup", 2.5),
        ("calibration.note", 5),
        ("calibration.arm", [1, 2]),
        ("cpu", "cortex-a53"),
        ("stands_for", ""),
    ],
)
def test_wrong_type_is_named(tmp_path: Path, good: dict, key: str, value: object) -> None:
    _expect_error(tmp_path, _set(good, key, value), key)


@pytest.mark.parametrize("key", ["budgets.ram_mb", "budgets.model_memory_mb", "budgets.storage_kb"])
def test_negative_budget_is_an_error(tmp_path: Path, good: dict, key: str) -> None:
    message = _expect_error(tmp_path, _set(good, key, -1), key)
    assert "greater than 0" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cpu.cores", 0),
        ("protocol.repeats", 0),
        ("protocol.warmup", -1),
        ("calibration.latency_scale", 0),
        ("calibration.source", "guessed"),
        ("measure.default_mode", "on-the-moon"),
        ("kernels.int8_activations", "int4"),
        ("session.graph_optimization", "max"),
        ("protocol.statistic", "median"),
        ("name", "My Board"),
    ],
)
def test_out_of_range_or_unknown_choice(tmp_path: Path, good: dict, key: str, value: object) -> None:
    _expect_error(tmp_path, _set(good, key, value), key)


def test_cross_field_checks(tmp_path: Path, good: dict) -> None:
    _expect_error(tmp_path, _set(good, "session.intra_op_threads", 8), "session.intra_op_threads")
    _expect_error(tmp_path, _set(good, "budgets.model_memory_mb", 4096), "budgets.model_memory_mb")
    armv7 = _set(_set(good, "cpu.arch", "armv7"), "measure.default_mode", "emulated-arm")
    assert "no armv7 onnxruntime" in _expect_error(tmp_path, armv7, "measure.default_mode")


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="must be a mapping"):
        load_profile(_write(tmp_path / "list.yaml", [1, 2]))


def test_optional_arm_weights_and_latency_table(tmp_path: Path, good: dict) -> None:
    data = _set(good, "calibration.arm", {"cycles": {"neon_fma": 1.0}, "source": "declared"})
    data["latency_table"] = "embedded-arm.latency.json"
    profile = load_profile(_write(tmp_path / "custom.yaml", data))
    assert profile.calibration.arm["cycles"]["neon_fma"] == 1.0
    assert profile.latency_table_path == tmp_path / "embedded-arm.latency.json"
    with pytest.raises(TypeError):
        profile.calibration.arm["x"] = 1  # read-only


def test_path_works_where_a_name_does_and_user_folder_shadows(home: Path, good: dict) -> None:
    folder = home / "profiles"
    folder.mkdir(parents=True)
    shadow = _set(good, "calibration.latency_scale", 12.5)
    _write(folder / "embedded-arm.yaml", shadow)
    assert load_profile("embedded-arm").calibration.latency_scale == 12.5
    assert load_profile("embedded-arm").path == folder / "embedded-arm.yaml"
    mine = _write(folder / "my-board.yaml", _set(good, "name", "my-board"))
    assert load_profile("my-board").name == "my-board"
    assert load_profile(str(mine)).name == "my-board"
    assert load_profile(mine).name == "my-board"
    rows = {e.name: e for e in list_profiles()}
    assert rows["embedded-arm"].origin == "user"
    assert rows["host"].origin == "built-in"
    assert rows["my-board"].profile is not None


def test_unknown_name_and_mismatched_file(home: Path, good: dict) -> None:
    with pytest.raises(ProfileError, match="unknown device profile 'pi5'; choose one of: embedded-arm"):
        load_profile("pi5")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("nowhere/board.yaml")
    folder = home / "profiles"
    folder.mkdir(parents=True)
    _write(folder / "board.yaml", good)  # says name: embedded-arm
    with pytest.raises(ProfileError, match="make them match"):
        load_profile("board")


def test_a_broken_user_profile_is_listed_with_its_error(home: Path, good: dict) -> None:
    folder = home / "profiles"
    folder.mkdir(parents=True)
    _write(folder / "broken.yaml", _drop(_set(good, "name", "broken"), "cpu.cores"))
    rows = {e.name: e for e in list_profiles()}
    assert rows["broken"].profile is None and "cpu.cores" in rows["broken"].error
    assert set(BUILT_IN) <= set(rows)


def test_write_profile_round_trips(tmp_path: Path) -> None:
    profile = load_profile("satellite-board")
    path = write_profile(profile, tmp_path / "out" / "satellite-board.yaml")
    again = load_profile(path)
    assert again == profile
    assert again.digest() == profile.digest()
    changed = profile_from_dict(_set(profile.to_dict(), "protocol.repeats", 7))
    assert changed.digest() != profile.digest()
