"""XLA flags for test processes: fake CPU devices, and XLA:CPU's quickest code generation.

Tests compile far more than they run (tiny shapes, many programs). Most of
XLA:CPU's compile time is LLVM optimising the generated code, and much of
the rest its fusion emitters (MLIR kernels for each fusion). At LLVM -O0 with
the older elemental emitters, the tiny trainer's step on a 2x4 mesh compiles
in 3 s against 14 s with the defaults (6.5-8 s at -O0 alone) and trains to
the same loss, its steps about 15% slower. Buffer assignment (what the memory
tests measure) and the HLO passes are unchanged. Benchmarks and users never
see these flags.

A child that trains for many steps on a GPT-2-sized vocabulary is the
exception: its steps' element-wise work over [tokens, 50400] logits runs
3-9x slower unoptimised (0.56-1.4 s a step against 0.16 s for the
preference-tuning example's SFT stage), more than the compiles save, so
such children take `fast_compile=False`. Inside a test process the same goes
for programs run hundreds of times over such a vocabulary (decoding loops, a
model trained for hundreds of steps) or over long contexts: their tests build
a Partitioner with RUN_HEAVY, which compiles just its programs at -O1 (64
decoded tokens of the padded-vocabulary parity model: 3.2 s at -O0, 0.48 s at
-O1; its programs compile no slower, though a train step's compile takes twice
as long). A run that a test starts from a config in its own process
(`gptj.train.train_and_evaluate`) gets the same with `compile_runs_heavy`.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int, fast_compile: bool = True) -> str:
    """XLA_FLAGS for a test process (or a child it starts) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE}" if fast_compile else "")


# XLA options for a Partitioner whose programs run far more than they compile (see the module doc).
RUN_HEAVY = {"xla_backend_optimization_level": 1}


def run_heavy_partitioner():
    """One device, megatron rules, programs compiled with RUN_HEAVY."""
    import jax

    from gptj.core.partitioning import Partitioner, make_mesh

    return Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron", compiler_options=RUN_HEAVY)


def compile_runs_heavy(monkeypatch):
    """Every Partitioner built from a config's mesh settings (`Partitioner.from_config`, as a training run in this
    process builds its own) compiles its programs with RUN_HEAVY, for the rest of the test."""
    from gptj.core.partitioning import Partitioner

    from_config = Partitioner.from_config

    def heavy(mesh_config, fold_stages=False):
        partitioner = from_config(mesh_config, fold_stages)
        partitioner.compiler_options = dict(RUN_HEAVY)
        return partitioner

    monkeypatch.setattr(Partitioner, "from_config", staticmethod(heavy))
