"""Profiles name their core: core -> qemu CPU model, the guest's cpuinfo, the cycle model."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from edgecompress.errors import ProfileError
from edgecompress.measure.arm import cycle_model_for
from edgecompress.measure.arm.cores import CLASSES, CORES, core_for, qemu_cpu_for
from edgecompress.profiles import list_profiles


def test_each_core_maps_to_its_own_qemu_model_never_max() -> None:
    assert qemu_cpu_for("cortex-a53") == "cortex-a53"
    assert qemu_cpu_for("cortex-a72") == "cortex-a72"
    assert qemu_cpu_for("Cortex-A76 ") == "cortex-a76"
    assert all(core.qemu_cpu != "max" for core in CORES.values())


def test_host_and_unknown_cores_are_refused_with_a_way_out() -> None:
    with pytest.raises(ProfileError, match="emulated-on-host"):
        core_for("host")
    with pytest.raises(ProfileError, match="cortex-a53, cortex-a72, cortex-a76"):
        core_for("cortex-a9")


def test_cpuinfo_names_the_core_by_its_midr() -> None:
    text = CORES["cortex-a76"].cpuinfo(n_cores=4)
    assert text.count("processor\t:") == 4
    assert "CPU implementer\t: 0x41" in text and "CPU part\t: 0xd0b" in text
    assert "asimddp" in text  # the A76 has dot product
    a53 = CORES["cortex-a53"].cpuinfo()
    assert "CPU part\t: 0xd03" in a53 and "asimddp" not in a53


def test_every_core_declares_every_class_with_a_source() -> None:
    for core in CORES.values():
        assert set(core.cycles) == set(CLASSES)
        assert all(value > 0 for value in core.cycles.values())
        assert core.source
    # The A76's dot product retires faster than the A53's widening multiplies.
    assert CORES["cortex-a76"].cycles["int_dot"] < CORES["cortex-a53"].cycles["int_mac"]


def test_built_in_aarch64_profiles_name_an_emulatable_core() -> None:
    arm = [e.profile for e in list_profiles() if e.profile and e.profile.cpu.arch == "aarch64"]
    assert {p.name for p in arm} >= {"embedded-arm", "mobile-cpu", "satellite-board"}
    for profile in arm:
        model = cycle_model_for(profile)
        assert model.core == core_for(profile.cpu.core).name
        assert model.clock_ghz == profile.cpu.clock_ghz
        assert model.bandwidth_gbps == profile.cpu.memory_bandwidth_gbps


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="qemu-aarch64 is not installed")
def test_qemu_knows_every_mapped_cpu_model() -> None:
    # qemu exits 1 after printing its list
    listed = subprocess.run(["qemu-aarch64", "-cpu", "help"], capture_output=True, text=True).stdout.split()
    assert {core.qemu_cpu for core in CORES.values()} <= set(listed)
