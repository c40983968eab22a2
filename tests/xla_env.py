"""XLA flags for test processes: fake CPU devices, and LLVM at -O0.

Tests compile far more than they run (tiny shapes, many programs), and most of
XLA:CPU's compile time is LLVM optimising the generated code; at -O0 the test
suite's compiles take about half the CPU time. Buffer assignment (what the memory
tests measure) and the HLO passes are unchanged. Benchmarks and users never see
this flag.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or a child it starts) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
