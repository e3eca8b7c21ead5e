"""The ARM cores emulated-arm can stand for: qemu's CPU model, the /proc/cpuinfo the guest
sees, and the declared cycles per instruction class (a starting point until a board
measures them).

Cycle figures are reciprocal throughputs (cycles one instruction of the class occupies
its pipeline in a steady stream), read from:

- Cortex-A53: Arm publishes no software optimization guide for it. Taken from LLVM's
  Cortex-A53 machine model (llvm/lib/Target/AArch64/AArch64SchedA53.td, itself derived
  from Arm's "Cortex-A53 Software Optimisation Specification - Instruction Timings"):
  in-order, dual issue, one load/store pipe, one FP multiply-accumulate pipe, a 64-bit
  Advanced SIMD datapath on which a 128-bit (Q-form) operation occupies its pipe for two
  cycles; two integer ALUs.
- Cortex-A72: Arm "Cortex-A72 Software Optimization Guide" (UAN 0016A, 2015), section 3
  (instruction characteristics): two FP/ASIMD pipes F0/F1, a Q-form FMLA uses both;
  ASIMD integer multiply(-accumulate) long on F0 only; one load pipe L, one store pipe S,
  one branch pipe B, two integer pipes I0/I1. Cross-checked with LLVM's Cortex-A57
  model, which LLVM uses for the A72.
- Cortex-A76: Arm "Cortex-A76 Software Optimization Guide" (PJDOC-466751330-7215,
  version 8.0, 2019), section 3: two 128-bit FP/ASIMD pipes V0/V1 each taking an FMLA or
  an SDOT/UDOT per cycle; ASIMD multiply long on V0 only, pairwise accumulate on V1
  only; two load/store address pipes with two store-data pipes; three integer pipes;
  one branch pipe. Cross-checked with LLVM's Neoverse N1 model (the N1 is derived from
  the A76).

The model adds the classes up, so it ignores the overlap an out-of-order core (A72,
A76) finds between them: it leans pessimistic there, which is what a fit to board
measurements (`cycle_model.fit_cycle_weights`) corrects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from edgecompress.errors import ProfileError

# Instruction classes the counting plugin reports, in its output order (counter.c).
CLASSES = (
    "fp_mla",  # floating-point (fused) multiply-add, vector or scalar
    "int_mac",  # SIMD integer multiply, multiply-accumulate, pairwise add-accumulate long
    "int_dot",  # SIMD integer dot product (SDOT/UDOT) and matrix multiply-accumulate
    "simd",  # other Advanced SIMD and floating-point data processing
    "load",
    "store",
    "branch",
    "sve_sme",  # SVE and SME: should stay zero on these cores
    "other",  # integer data processing and system instructions
)


@dataclass(frozen=True)
class Core:
    """One ARM core type: how qemu emulates it and what its instructions cost."""

    name: str
    qemu_cpu: str  # qemu's -cpu model: never "max", which adds SVE/SME these cores lack
    midr: tuple[int, int, int, int]  # implementer, variant, part, revision
    features: str  # the Features line of its /proc/cpuinfo
    cycles: Mapping[str, float]  # declared cycles per instruction, per class
    source: str  # where the cycle figures come from

    def cpuinfo(self, n_cores: int = 1) -> str:
        """The /proc/cpuinfo text a Linux kernel on this core prints."""
        implementer, variant, part, revision = self.midr
        block = (
            "processor\t: {i}\n"
            "BogoMIPS\t: 108.00\n"
            f"Features\t: {self.features}\n"
            f"CPU implementer\t: 0x{implementer:02x}\n"
            "CPU architecture: 8\n"
            f"CPU variant\t: 0x{variant:x}\n"
            f"CPU part\t: 0x{part:03x}\n"
            f"CPU revision\t: {revision}\n\n"
        )
        return "".join(block.format(i=i) for i in range(max(1, n_cores)))


def _cycles(**values: float) -> Mapping[str, float]:
    assert set(values) == set(CLASSES), set(values) ^ set(CLASSES)
    return MappingProxyType(dict(values))


_A53_SOURCE = (
    "LLVM AArch64SchedA53.td (after Arm's Cortex-A53 Software Optimisation Specification); "
    "Arm publishes no Cortex-A53 software optimization guide"
)
_A72_SOURCE = "Arm Cortex-A72 Software Optimization Guide, UAN 0016A (2015), section 3"
_A76_SOURCE = "Arm Cortex-A76 Software Optimization Guide, PJDOC-466751330-7215 v8.0 (2019), section 3"

CORES: Mapping[str, Core] = MappingProxyType(
    {
        "cortex-a53": Core(
            name="cortex-a53",
            qemu_cpu="cortex-a53",
            midr=(0x41, 0x0, 0xD03, 4),
            features="fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid",
            cycles=_cycles(
                fp_mla=2.0,  # Q-form FMLA holds the single FP MAC pipe two cycles
                int_mac=2.0,  # Q-form integer multiply / pairwise accumulate, 64-bit datapath
                int_dot=2.0,  # the A53 has no dot product; kept for completeness
                simd=1.5,  # D-form 1 cycle, Q-form 2
                load=1.5,  # one load/store pipe; a 128-bit load issues over two cycles
                store=1.0,
                branch=1.0,
                sve_sme=1.0,
                other=0.5,  # two integer ALUs, dual issue
            ),
            source=_A53_SOURCE,
        ),
        "cortex-a72": Core(
            name="cortex-a72",
            qemu_cpu="cortex-a72",
            midr=(0x41, 0x0, 0xD08, 3),
            features="fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid",
            cycles=_cycles(
                fp_mla=1.0,  # Q-form FMLA on F0+F1: one per cycle
                int_mac=1.0,  # multiply long on F0, pairwise accumulate on F1
                int_dot=1.0,  # the A72 has no dot product; kept for completeness
                simd=0.75,  # D-form on either pipe, Q-form on both
                load=1.0,  # one load pipe
                store=1.0,  # one store pipe
                branch=1.0,  # one branch pipe
                sve_sme=1.0,
                other=0.5,  # two integer pipes
            ),
            source=_A72_SOURCE,
        ),
        "cortex-a76": Core(
            name="cortex-a76",
            qemu_cpu="cortex-a76",
            midr=(0x41, 0x4, 0xD0B, 1),
            features=(
                "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                "asimdrdm lrcpc dcpop asimddp ssbs"
            ),
            cycles=_cycles(
                fp_mla=0.5,  # FMLA on V0 or V1
                int_mac=1.0,  # multiply long on V0 only, pairwise accumulate on V1 only
                int_dot=0.5,  # SDOT/UDOT on V0 or V1
                simd=0.5,
                load=0.5,  # two load/store address pipes
                store=0.5,  # two store-data pipes
                branch=1.0,  # one branch pipe
                sve_sme=1.0,
                other=0.34,  # three integer pipes
            ),
            source=_A76_SOURCE,
        ),
    }
)


def core_for(name: str) -> Core:
    """The core a profile's `cpu.core` names; `host` and unknown names are refused."""
    key = name.strip().lower()
    if key in CORES:
        return CORES[key]
    if key == "host":
        raise ProfileError(
            "the profile's cpu.core is 'host', which emulated-arm cannot emulate; "
            "use --mode emulated-on-host, or set cpu.core to one of: " + ", ".join(CORES)
        )
    raise ProfileError(f"unknown cpu.core {name!r} for emulated-arm; choose one of: " + ", ".join(CORES))


def qemu_cpu_for(name: str) -> str:
    """qemu's -cpu model for a profile's core name."""
    return core_for(name).qemu_cpu
