"""The counting plugin: its instruction classifier, its output format, the per-node join."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgecompress.errors import MeasureError
from edgecompress.measure.arm.cores import CLASSES
from edgecompress.measure.arm.plugin import (
    ClockCall,
    node_counts,
    parse_output,
    source_text,
)

# (assembly, encoding, class). Encodings from `llvm-mc -triple=aarch64 -show-encoding`.
INSTRUCTIONS = [
    ("fmla v0.4s, v1.4s, v2.s[0]", 0x4F821020, "fp_mla"),
    ("fmla v0.4s, v1.4s, v2.4s", 0x4E22CC20, "fp_mla"),
    ("fmls v0.2d, v1.2d, v2.2d", 0x4EE2CC20, "fp_mla"),
    ("fmadd s0, s1, s2, s3", 0x1F020C20, "fp_mla"),
    ("fmla s0, s1, v2.s[1]", 0x5FA21020, "fp_mla"),
    ("sdot v0.4s, v1.16b, v2.16b", 0x4E829420, "int_dot"),
    ("udot v0.4s, v1.16b, v2.4b[0]", 0x6F82E020, "int_dot"),
    ("smull v0.8h, v1.8b, v2.8b", 0x0E22C020, "int_mac"),
    ("smull2 v0.8h, v1.16b, v2.16b", 0x4E22C020, "int_mac"),
    ("smlal v0.8h, v1.8b, v2.8b", 0x0E228020, "int_mac"),
    ("umlal2 v0.4s, v1.8h, v2.8h", 0x6E628020, "int_mac"),
    ("smull v0.4s, v1.4h, v2.h[1]", 0x0F52A020, "int_mac"),
    ("sadalp v0.4s, v1.8h", 0x4E606820, "int_mac"),
    ("uadalp v0.8h, v1.16b", 0x6E206820, "int_mac"),
    ("mla v0.4s, v1.4s, v2.4s", 0x4EA29420, "int_mac"),
    ("mul v0.4s, v1.4s, v2.s[0]", 0x4F828020, "int_mac"),
    ("fadd v0.4s, v1.4s, v2.4s", 0x4E22D420, "simd"),
    ("fmul v0.4s, v1.4s, v2.s[0]", 0x4F829020, "simd"),
    ("fmax v0.4s, v1.4s, v2.4s", 0x4E22F420, "simd"),
    ("saddlp v0.4s, v1.8h", 0x4E602820, "simd"),
    ("dup v0.4s, w1", 0x4E040C20, "simd"),
    ("ldr q0, [x1]", 0x3DC00020, "load"),
    ("str q0, [x1]", 0x3D800020, "store"),
    ("ldr d0, [x1, #8]", 0xFD400420, "load"),
    ("ldp x0, x1, [sp]", 0xA94007E0, "load"),
    ("stp x29, x30, [sp, #-16]!", 0xA9BF7BFD, "store"),
    ("ldp q0, q1, [x0], #32", 0xACC10400, "load"),
    ("stp q0, q1, [x0]", 0xAD000400, "store"),
    ("ld1 {v0.16b}, [x0]", 0x4C407000, "load"),
    ("st1 {v0.16b}, [x0]", 0x4C007000, "store"),
    ("ld1r {v0.4s}, [x0]", 0x4D40C800, "load"),
    ("ld1 {v0.s}[1], [x0]", 0x0D409000, "load"),
    ("ldr x0, [x1]", 0xF9400020, "load"),
    ("str x0, [x1]", 0xF9000020, "store"),
    ("ldrb w0, [x1, x2]", 0x38626820, "load"),
    ("strh w0, [x1], #2", 0x78002420, "store"),
    ("ldrsw x0, [x1]", 0xB9800020, "load"),
    ("ldur q0, [x1, #-16]", 0x3CDF0020, "load"),
    ("ldr x0, #8", 0x58000040, "load"),
    ("prfm pldl1keep, [x0]", 0xF9800000, "load"),
    ("ldxr x0, [x1]", 0xC85F7C20, "load"),
    ("stxr w2, x0, [x1]", 0xC8027C20, "store"),
    ("ldar x0, [x1]", 0xC8DFFC20, "load"),
    ("stlr x0, [x1]", 0xC89FFC20, "store"),
    ("ldadd w0, w1, [x2]", 0xB8200041, "store"),
    ("b #8", 0x14000002, "branch"),
    ("bl #8", 0x94000002, "branch"),
    ("ret", 0xD65F03C0, "branch"),
    ("br x3", 0xD61F0060, "branch"),
    ("blr x3", 0xD63F0060, "branch"),
    ("b.eq #8", 0x54000040, "branch"),
    ("cbz x0, #8", 0xB4000040, "branch"),
    ("tbnz w0, #3, #8", 0x37180040, "branch"),
    ("add z0.s, z1.s, z2.s", 0x04A20020, "sve_sme"),
    ("add x0, x1, x2", 0x8B020020, "other"),
    ("madd x0, x1, x2, x3", 0x9B020C20, "other"),
    ("svc #0", 0xD4000001, "other"),
    ("nop", 0xD503201F, "other"),
    ("mrs x0, tpidr_el0", 0xD53BD040, "other"),
    ("mov x0, #1", 0xD2800020, "other"),
    ("csel x0, x1, x2, eq", 0x9A820020, "other"),
]


@pytest.fixture(scope="module")
def classify(tmp_path_factory: pytest.TempPathFactory):
    """counter.c's classifier, from a test build of the plugin loaded with ctypes."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to build the counting plugin")
    folder = tmp_path_factory.mktemp("plugin")
    source = folder / "counter.c"
    source.write_text(source_text())
    library = folder / "counter-test.so"
    subprocess.run(
        [gcc, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-DEDGECOMPRESS_TEST"]
        + ["-o", str(library), str(source)],
        check=True,
        capture_output=True,
    )
    # The qemu_plugin_* functions resolve only inside qemu; lazy binding leaves them be.
    handle = ctypes.CDLL(str(library), mode=os.RTLD_LAZY)
    function = handle.edgecompress_classify
    function.argtypes = [ctypes.c_uint32]
    function.restype = ctypes.c_int
    return lambda word: CLASSES[function(word)]


@pytest.mark.parametrize(("text", "word", "expected"), INSTRUCTIONS, ids=[i[0] for i in INSTRUCTIONS])
def test_classifier_puts_each_instruction_in_its_class(classify, text, word, expected) -> None:
    assert classify(word) == expected


def test_plugin_source_builds_without_warnings(classify) -> None:
    # The fixture compiled it with -Wall -Werror; the C enum must match CLASSES.
    text = source_text()
    assert text.index("C_FP_MLA") < text.index("C_INT_MAC") < text.index("C_DOT")
    assert "N_CLASSES" in text and len(CLASSES) == 9


def _line(kind: str, *numbers: int) -> str:
    return " ".join([kind, *map(str, numbers)])


def test_parse_output_reads_regions_and_clock_calls() -> None:
    text = "\n".join(
        [
            _line("region", 0, *range(1, 10)),
            _line("clock", 7, 123, *([5] * 9)),
            _line("clock", 7, 456, *([6] * 9)),
            _line("region", 7, *([9] * 9)),
            "warning virtual clock off: guest memory is not at host addresses",
            "",
        ]
    )
    out = parse_output(text)
    assert out.warnings == ("virtual clock off: guest memory is not at host addresses",)
    assert out.regions[0].by_class["fp_mla"] == 1 and out.regions[0].by_class["other"] == 9
    assert out.regions[0].total == sum(range(1, 10))
    assert [c.time_ns for c in out.clocks[7]] == [123, 456]
    assert (out.clocks[7][1].counts - out.clocks[7][0].counts).total == 9


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("region 0 1 2 3", "wrote 3 classes"),
        ("hello 1 2", "unreadable line 1"),
        ("clock x 1 1 2 3 4 5 6 7 8 9", "unreadable"),
    ],
)
def test_parse_output_rejects_what_it_cannot_read(text: str, fragment: str) -> None:
    with pytest.raises(MeasureError, match=fragment):
        parse_output(text)


def _calls(stamps_and_totals: list[tuple[int, int]]) -> tuple[ClockCall, ...]:
    out = parse_output("\n".join(_line("clock", 1, t, n, *([0] * 8)) for t, n in stamps_and_totals))
    return out.clocks[1]


def _event(name: str, ts_us: int, dur_us: int, op: str = "Conv") -> dict:
    args = {"op_name": op, "parameter_size": "100", "activation_size": "40", "output_size": "60"}
    return {"cat": "Node", "ph": "X", "name": f"{name}_kernel_time", "ts": ts_us, "dur": dur_us, "args": args}


def test_node_counts_join_profile_events_to_clock_calls_in_order() -> None:
    start = 1_000_000_000  # profiling start, ns
    calls = _calls(
        [
            (start + 90_000, 100),  # executor start
            (start + 99_990, 110),  # A begins (stamped just before the guest read 100.0 us)
            (start + 150_400, 5_110),  # A ends (guest read 150.5 us: dur truncated to 50)
            # B begins: the host thread was descheduled for 87 us between the plugin's
            # stamp and the guest's clock read, so the stamp is far from the profile's ts.
            (start + 163_000, 5_200),
            (start + 299_900, 9_200),  # B ends
            (start + 310_000, 9_300),  # executor end
        ]
    )
    events = [
        _event("warmup", 10, 20),  # the warm-up run, before the traced region
        _event("A", 100, 50),
        _event("B", 250, 49, "Relu"),
        {"cat": "Session", "ph": "X", "name": "model_run", "ts": 90, "dur": 220},
    ]
    nodes = node_counts(calls, events, start)
    found = [(n.name, n.op_type, n.counts.total) for n in nodes]
    assert found == [("A", "Conv", 5_000), ("B", "Relu", 4_000)]
    assert nodes[0].bytes_touched == 200
    assert nodes[0].as_dict()["by_class"]["fp_mla"] == 5_000


def test_node_counts_without_calls_are_empty() -> None:
    assert node_counts((), [_event("A", 1, 1)], 0) == ()


def test_profile_file_errors_are_measure_errors(tmp_path: Path) -> None:
    from edgecompress.measure.arm.plugin import read_profile

    bad = tmp_path / "profile.json"
    bad.write_text("{not json")
    with pytest.raises(MeasureError, match="cannot read onnxruntime's profile"):
        read_profile(bad)
