"""XLA flags for test processes: fake CPU devices, and LLVM at -O0.

Tests compile far more than they run (tiny shapes, many programs), and most of
XLA:CPU's compile time is LLVM optimising the generated code; at -O0 the test
suite's compiles take about half the CPU time. Buffer assignment (what the memory
tests measure) and the HLO passes are unchanged. Benchmarks and users never see
this flag.

A child that trains for many steps on a GPT-2-sized vocabulary is the
exception: its steps' element-wise work over [tokens, 50400] logits runs
3-9x slower unoptimised (0.56-1.4 s a step against 0.16 s for the
preference-tuning example's SFT stage), more than the compiles save, so
such children take `fast_compile=False`.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, fast_compile: bool = True) -> str:
    """XLA_FLAGS for a test process (or a child it starts) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE}" if fast_compile else "")
