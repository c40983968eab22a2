"""The hardware a plan is for (`--mode=plan --target=`), compiled by that hardware's own compiler on this machine.

A CPU machine compiles for TPUs and NVIDIA GPUs it does not have: libtpu (the
`tpu` extra) and XLA's CUDA plugin (the `cuda12` extra) each describe a
topology of compile-only devices (`jax.experimental.topologies`), and a
program lowered onto a mesh of them is compiled by the real compiler, which
fuses, rematerialises and assigns buffers as it will on the hardware.
Nothing runs, so nothing needs a device, a driver or the CUDA libraries.

    parse_target("tpu:v3-8")    8 TPU v3 cores (Cloud TPU names count what Google counts: cores for
                                v3, v4 and v5p, chips for v5e and v6e)
    parse_target("gpu:h100x64") 64 H100 SXM GPUs, 8 hosts of 8 (gpu:h100 is one)

`target_partitioner` lays a config's mesh onto the target's devices (loading
its compiler), `compiler_options` are what that compiler needs on a machine
without the device, and `program_cost` reads a compiled program's FLOPs, HBM
bytes and collective traffic per device: XLA's HLO cost analysis counts a
loop's body once, so the walk here multiplies every loop body (the layer
scan, the microbatch loop) by its trip count, and it adds the matmuls the
GPU compiler hands to cuBLAS (custom calls, which the analysis counts as free). `step_time_bound` turns them
into the least time a step can take on the target (the peak FLOP/s, HBM and
interconnect bandwidth of its `gptj.hardware.Accelerator`).

The compilers: installed as extras (`pip install -e '.[tpu,cuda12]'`), or in
a folder of their own that only a `--target` plan loads (`COMPILERS_DIR`,
where `scripts/install.sh` puts them): a Python process that finds them among
its site-packages loads both plugins when jax starts, about a second and a
few lines of libtpu and CUDA start-up chatter on a machine without TPUs or
GPUs; in their own folder they cost nothing to any other run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from gptj.core import runtime
from gptj.core.partitioning import MESH_AXES, Partitioner, resolve_mesh_shape
from gptj.errors import ConfigError, GptjError
from gptj.hardware import ACCELERATORS, Accelerator

# Where scripts/install.sh puts the compilers, so that jax does not load them at every start.
COMPILERS_DIR = Path(os.environ.get("GPTJ_TARGET_COMPILERS", os.path.join(sys.prefix, "target-compilers")))

# The GPU target configs (XLA GpuTargetConfig text protos), one per GPU model: gptj/target_configs/.
TARGET_CONFIGS_DIR = Path(__file__).resolve().parent / "target_configs"


class TargetError(ConfigError):
    """A `--target` that names no hardware we compile for, or that cannot be compiled for here."""


# Chip grids of Cloud TPU slices, by chip count: a 2D torus (v3, v5e, v6e) or 3D (v4, v5p), as libtpu names them.
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16", 512: "16x32",
           1024: "32x32"}
GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8",
           1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}

# What a --target names: a TPU generation (tpu:v3-8 -> "v3") or a GPU model XLA has a target config of (gpu:h100).
TPU_GENERATIONS = {a.topology_prefix: a for a in ACCELERATORS.values() if a.platform == "tpu"}
GPU_MODELS = {name: a for name, a in ACCELERATORS.items() if a.target_config}

TARGET_EXAMPLES = "tpu:v3-8, tpu:v3-256, tpu:v4-8, tpu:v5e-8, tpu:v5p-8, tpu:v6e-8, gpu:h100, gpu:h100x8, gpu:h200x64"


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice or cluster to plan for: `devices` JAX devices of one accelerator generation."""

    spec: str  # as given: "tpu:v3-8"
    accelerator: Accelerator
    devices: int
    topology: str  # libtpu's topology name ("v3:2x2") or the CUDA plugin's "slices x hosts x devices" ("1x1x8")

    @property
    def hosts(self) -> int:
        """How many hosts the devices sit on (GPU targets: a host is a fast domain of 8; TPU slices: as the
        topology says)."""
        if self.accelerator.platform == "cuda":
            return max(1, self.devices // self.accelerator.fast_domain)
        return 1

    @property
    def compiler(self) -> str:
        """Which compiler plans it: 'the TPU compiler' or 'the GPU compiler'."""
        return "the TPU compiler" if self.accelerator.platform == "tpu" else "the GPU compiler (XLA:GPU, CUDA)"

    def describe(self) -> str:
        """'8 TPU v3 devices (tpu:v3-8)' / '64 NVIDIA H100 SXM devices, 8 hosts of 8 (gpu:h100x64)'."""
        hosts = f", {self.hosts} hosts of {self.devices // self.hosts}" if self.hosts > 1 else ""
        return f"{self.devices} {self.accelerator.name} device{'s' if self.devices > 1 else ''}{hosts} ({self.spec})"


def parse_target(spec: str) -> Target:
    """The `Target` named by `spec` ('tpu:v3-8', 'gpu:h100x8'); a TargetError names what is sold otherwise."""
    kind, _, name = spec.partition(":")
    kind, name = kind.strip().lower(), name.strip().lower()
    if kind == "tpu":
        generation, _, count = name.partition("-")
        accelerator = TPU_GENERATIONS.get(generation)
        if accelerator is None or not count.isdigit():
            raise TargetError(f"unknown --target={spec!r}: a TPU target is tpu:GENERATION-COUNT with GENERATION one "
                              f"of {', '.join(sorted(TPU_GENERATIONS))} (e.g. {TARGET_EXAMPLES})")
        count = int(count)
        if count not in accelerator.sizes:
            raise TargetError(f"--target={spec!r}: {accelerator.name} is not sold as {generation}-{count}; slices "
                              f"are {', '.join(f'{generation}-{n}' for n in accelerator.sizes)}")
        devices = count // accelerator.cores_per_device
        chips = count // 2 if generation == "v3" else devices  # a v3 chip holds two devices (cores)
        grid = (GRID_3D if accelerator.chip_config == "megacore" else GRID_2D)[chips]
        return Target(spec, accelerator, devices, f"{accelerator.topology_prefix}:{grid}")
    if kind == "gpu":
        model, _, count = name.partition("x")
        accelerator = GPU_MODELS.get(model)
        if accelerator is None or (count and not count.isdigit()):
            raise TargetError(f"unknown --target={spec!r}: a GPU target is gpu:MODEL or gpu:MODELxCOUNT with MODEL "
                              f"one of {', '.join(sorted(GPU_MODELS))} (e.g. {TARGET_EXAMPLES})")
        count = int(count or 1)
        per_host = accelerator.fast_domain
        if count not in accelerator.sizes and (count % per_host or count == 0):
            sizes = ", ".join(map(str, accelerator.sizes))
            raise TargetError(f"--target={spec!r}: {accelerator.name} GPUs come {sizes} to a host, or in whole "
                              f"hosts of {per_host} (gpu:{model}x16, gpu:{model}x64, ...)")
        hosts = max(1, count // per_host)
        return Target(spec, accelerator, count, f"1x{hosts}x{count // hosts}")
    raise TargetError(f"unknown --target={spec!r}: name a TPU slice or GPUs, e.g. {TARGET_EXAMPLES}")


# -- the compilers ----------------------------------------------------------------------------------------------

EXTRAS = {"tpu": "tpu", "cuda": "cuda12"}


def _spec_found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _tpu_library() -> str | None:
    """libtpu.so: from the installed libtpu package, else from COMPILERS_DIR (None: not installed)."""
    if _spec_found("libtpu"):
        return str(Path(importlib.util.find_spec("libtpu").origin).parent / "libtpu.so")
    path = COMPILERS_DIR / "libtpu" / "libtpu.so"
    return str(path) if path.is_file() else None


def _cuda_plugin_dir() -> str | None:
    """'' when XLA's CUDA plugin is installed among the site-packages, COMPILERS_DIR when there, else None."""
    if _spec_found("jax_plugins.xla_cuda12"):
        return ""
    return str(COMPILERS_DIR) if (COMPILERS_DIR / "jax_plugins" / "xla_cuda12").is_dir() else None


def compiler_installed(platform: str) -> bool:
    """Whether the compiler for `platform` ('tpu' or 'cuda') can be loaded (nothing is loaded to tell)."""
    return (_tpu_library() if platform == "tpu" else _cuda_plugin_dir()) is not None


def _compilers_current() -> bool:
    """Whether both compilers are installed in the versions the installed jax asks for."""
    from packaging.requirements import Requirement

    if not (compiler_installed("tpu") and compiler_installed("cuda")):
        return False
    for requirement in map(Requirement, compiler_requirements()):
        found = [d.version for path in (sys.path, [str(COMPILERS_DIR)])
                 for d in importlib.metadata.distributions(name=requirement.name, path=path)]
        if not any(requirement.specifier.contains(version, prereleases=True) for version in found):
            return False
    return True


def compiler_requirements() -> list[str]:
    """The pip requirements of both compilers, matched to the installed jax (what the extras resolve to)."""
    libtpu = next((r.split(";")[0].strip() for r in importlib.metadata.requires("jax") or ()
                   if r.startswith("libtpu") and 'extra == "tpu"' in r), None)
    if libtpu is None:
        raise GptjError(f"jax {jax.__version__} names no libtpu for its 'tpu' extra")
    version = importlib.metadata.version("jaxlib")
    return [libtpu, f"jax-cuda12-plugin=={version}", f"jax-cuda12-pjrt=={version}"]


def check_compiler(target: Target) -> None:
    """Raises a TargetError naming the extra to install when the target's compiler is missing."""
    platform = target.accelerator.platform
    if compiler_installed(platform):
        return
    what = "libtpu, the TPU compiler" if platform == "tpu" else "XLA's CUDA plugin, the GPU compiler"
    raise TargetError(f"--target={target.spec} needs {what}: pip install -e '.[{EXTRAS[platform]}]' "
                      f"(or scripts/install.sh, which puts both compilers in {COMPILERS_DIR})")


@contextlib.contextmanager
def chatter_held():
    """Keeps what the compilers print on stderr (libtpu's and CUDA's start-up lines, "compile with a GPU
    present" warnings) off the console; --verbosity=1 lets it through. Their errors still raise."""
    from absl import logging

    if logging.get_verbosity() >= 1:
        yield
        return
    with runtime.stderr_silenced():
        yield


@contextlib.contextmanager
def _environment(**values: str):
    """`values` set in os.environ inside (where not set already), and taken out again after: the compilers
    read them while they start, and neither this process's later runs nor its children may see them."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _tpu_topology(target: Target):
    """The TPU compiler's topology of `target` (libtpu loaded from where it is installed, started once)."""
    from jax._src.lib import xla_client
    from jax.experimental import topologies

    if not xla_client.pjrt_plugin_loaded("tpu"):
        xla_client.load_pjrt_plugin_dynamically("tpu", _tpu_library())
    # libtpu looks for the TPU it runs on unless told what it is: without these it asks the
    # metadata server and warns, on a machine with none. Its lock file (one process per TPU)
    # would keep two planning processes from compiling at once: they use no TPU.
    with _environment(ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_SKIP_MDS_QUERY="1",
                      TPU_ACCELERATOR_TYPE=target.spec.split(":", 1)[1], TPU_WORKER_HOSTNAMES="localhost",
                      TPU_WORKER_ID="0"):
        return topologies.get_topology_desc(target.topology, platform="tpu",
                                            chip_config_name=target.accelerator.chip_config)


def _gpu_topology(target: Target):
    """The GPU compiler's topology of `target`: XLA's CUDA plugin registered once, with the target's config."""
    from jax._src import xla_bridge
    from jax.experimental import topologies

    if "cuda" not in xla_bridge._backend_factories:  # not registered when jax started (no GPU, no extra)
        where = _cuda_plugin_dir()
        if where and where not in sys.path:
            sys.path.append(where)
        # Compiling needs neither a GPU nor the CUDA libraries: skip the plugin's check of their
        # versions (it would call into CUDA and fail).
        with _environment(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1"):
            importlib.import_module("jax_plugins.xla_cuda12").initialize()
    config = (TARGET_CONFIGS_DIR / target.accelerator.target_config).read_text()
    return topologies.get_topology_desc(platform="cuda", topology_name=target.accelerator.name,
                                        target_config=config, topology=target.topology)


def target_devices(target: Target) -> list:
    """The target's compile-only devices, from its compiler's topology (loading the compiler once)."""
    check_compiler(target)
    jax.devices()  # this process's own backend first, so that jax never tries to run on the loaded plugin
    with chatter_held():
        topology = _tpu_topology(target) if target.accelerator.platform == "tpu" else _gpu_topology(target)
    return list(topology.devices)


def mesh_shape(target: Target, data: int, model: int, stage: int = 1) -> tuple[int, int]:
    """The config's mesh on the target: both sizes given may use some of its devices; -1 takes the rest."""
    if data > 0 and model > 0 and target.devices % (stage * data * model) == 0:
        return data, model
    try:
        return resolve_mesh_shape(data, model, target.devices, stage)
    except GptjError as e:
        if "devices" not in str(e):  # a size that is no size at all: the mesh's own message
            raise TargetError(f"{e} (--target={target.spec})") from e
        mesh = f"stage={stage} x data={data} x model={model}" if stage > 1 else f"data={data} x model={model}"
        raise TargetError(f"mesh {mesh} does not divide the {target.devices} devices of "
                          f"{target.spec}; --config.mesh.data=-1 takes the rest") from e


def target_partitioner(target: Target, mesh_settings) -> Partitioner:
    """The config's mesh (`settings.mesh`) and rule set over the target's devices (its compiler loaded)."""
    from jax.experimental import mesh_utils

    stage = mesh_settings.stage
    data, model = mesh_shape(target, mesh_settings.data, mesh_settings.model, stage)
    devices = target_devices(target)[:stage * data * model]
    try:  # neighbours on the torus / NVLink for the model axis, as on the hardware
        grid = mesh_utils.create_device_mesh((stage, data, model), devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(stage, data, model)
    return Partitioner(Mesh(grid, MESH_AXES), mesh_settings.rules)


def compiler_options(target: Target) -> dict | None:
    """XLA options the target's compiler needs on a machine without the device."""
    if target.accelerator.platform == "cuda":
        return {
            # With no GPU to ask, the GPU compiler cannot pick CUB's sort kernels: XLA's own sort instead.
            "xla_gpu_deviceless_cub_mode": "DEVICELESS_CUB_DISABLED",
            # Matmuls through cuBLAS, not Triton: with no GPU to autotune on, the compiler cannot choose
            # between them, and generating Triton's kernels doubled the compile (101 s against 48 s for a
            # 4-layer, d_model 1024 train step) for the same buffers (temporaries within 21 KB of 2.3 GiB).
            "xla_gpu_enable_triton_gemm": False,
        }
    return None


def refusal(error: Exception) -> str | None:
    """The TPU compiler's out-of-memory refusal as one line ('... exceeds available HBM (15.48G)'), else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    return text.split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0].strip()


def refused_temporaries(message: str) -> int | None:
    """The temporaries a refusal says the program needs ('... HLO temporaries (15.84G) ...'), in bytes."""
    match = re.search(r"temporaries \((\d+(?:\.\d+)?)([KMGT])\)", message)
    if match is None:
        return None
    return int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024)


# -- what a compiled program does: FLOPs, HBM bytes, collectives --------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) [(].*[{]\s*$")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \(?(\w+)\[([\d,]*)\]")
_GEMM_CALL = re.compile(r'custom-call\(%?([\w.\-]+), .*custom_call_target="__cublas\$(?:lt\$)?matmul"'
                        r'.*?"lhs_contracting_dimensions":\[([^\]]*)\]')


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Per device, per run of a compiled program (loops counted as many times as they run)."""

    flops: float
    bytes_accessed: float
    link_bytes: float  # what collectives send over the fast links (ICI, NVLink), ring algorithms
    host_link_bytes: float  # what they send between hosts (GPU targets: InfiniBand)
    collectives: dict  # kind -> number of collective ops run per step
    uncounted_loops: int = 0  # loops whose trip count could not be read (counted once)


def _array_bytes(type_text: str) -> float:
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(type_text))


@dataclasses.dataclass(frozen=True)
class HloText:
    """An HLO module's text in parts: what sits between its header line and its first computation (the tables
    of source locations that instructions' metadata refer to), each computation's text from its header (without
    ENTRY) to its closing brace, in the module's order, and the entry's name."""

    preamble: str
    blocks: list[tuple[str, list[str]]]
    entry: str | None

    @classmethod
    def parse(cls, text: str) -> "HloText":
        preamble, blocks, entry, lines = [], [], None, None
        for line in text.splitlines()[1:]:
            header = _HEADER.match(line)
            if header:
                lines = [line[len("ENTRY "):] if header.group(1) else line]
                blocks.append((header.group(2), lines))
                entry = header.group(2) if header.group(1) else entry
            elif lines is not None:
                lines.append(line)
                if line.startswith("}"):
                    lines = None
            elif not blocks:
                preamble.append(line)
        return cls("\n".join(preamble), blocks, entry)

    @property
    def computations(self) -> dict[str, list[str]]:
        """{computation name: its instruction lines}."""
        return {name: lines[1:-1] for name, lines in self.blocks}

    def module_of(self, name: str, reached: set[str]) -> str:
        """The text of a module of the computations in `reached`, computation `name` its entry."""
        body = ["\n".join((["ENTRY " + lines[0]] if block == name else lines[:1]) + lines[1:])
                for block, lines in self.blocks if block in reached]
        return "\n".join(["HloModule cost", self.preamble, *body])


def hlo_computations(text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} of an HLO module's text, and the entry's name."""
    parsed = HloText.parse(text)
    return parsed.computations, parsed.entry


def _callees(line: str) -> list[str]:
    """The computations an instruction line calls: fusions, reductions, loop bodies and conditions, branches."""
    called = _CALLEES.findall(line)
    branches = _BRANCHES.search(line)
    if branches:
        called += [c.strip().lstrip("%") for c in branches.group(1).split(",")]
    return called


def _reachable(name: str, computations: dict[str, list[str]]) -> set[str]:
    """Computation `name` and every computation it calls, directly or not."""
    reached, stack = {name}, [name]
    while stack:
        for line in computations.get(stack.pop(), []):
            for callee in _callees(line):
                if callee in computations and callee not in reached:
                    reached.add(callee)
                    stack.append(callee)
    return reached


def _constant(lines: list[str], name: str) -> int | None:
    for line in lines:
        match = re.match(r"\s*(?:ROOT )?%?" + re.escape(name) + r" = s32\[\][^ ]* constant\((-?\d+)\)", line)
        if match:
            return int(match.group(1))
    return None


def _trip_count(line: str, computations: dict[str, list[str]]) -> int | None:
    """How many times a while loop runs: XLA's annotation (GPU), else read from its condition (i < N)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", line).group(1)
    lines = computations.get(condition, [])
    root = next((l for l in lines if l.lstrip().startswith("ROOT ")), "")
    compare = re.search(r"compare\(%?([\w.\-]+), %?([\w.\-]+)\), direction=(LT|GT|NE)", root)
    if compare is None:
        return None
    bound = _constant(lines, compare.group(2)) if compare.group(3) != "GT" else _constant(lines, compare.group(1))
    return bound if bound is not None and bound > 0 else None


def _gemm_flops(lines: list[str]) -> float:
    """FLOPs of the cuBLAS matmuls (custom calls) among a computation's instructions, 2 per multiply-add.

    The output's elements times the contracted size, read from the left operand's shape
    (defined earlier in the same computation) at its contracting dimensions.
    """
    dims: dict[str, list[int]] = {}
    total = 0.0
    for line in lines:
        defined = _DEFINITION.match(line)
        if defined is None:
            continue
        name, shape = defined.group(1), [int(x) for x in defined.group(3).split(",") if x]
        dims[name] = shape
        gemm = _GEMM_CALL.search(line)
        if gemm is not None and gemm.group(1) in dims:
            lhs = dims[gemm.group(1)]
            contracted = math.prod(lhs[int(d.strip('"'))] for d in gemm.group(2).split(",") if d.strip())
            total += 2.0 * math.prod(shape) * contracted
    return total


def _collective(line: str, device_hosts: list[int]) -> tuple[str, float, bool] | None:
    """(kind, bytes one device sends, whether a group spans hosts) of a collective instruction line."""
    match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
    if match is None:
        return None
    type_text, kind, start = match.groups()
    elements = [_DTYPE_BYTES[d] * math.prod(int(x) for x in s.split(",") if x) for d, s in _ARRAY.findall(type_text)]
    if start and kind in ("all-gather", "collective-permute") and len(elements) >= 2:
        # async starts carry (operands..., results...[, contexts]): the result half
        arrays = [e for e in elements if e > 4] or elements
        size = sum(arrays[len(arrays) // 2:]) if kind == "all-gather" else arrays[0]
    else:
        size = sum(elements)
    groups = _replica_groups(line, len(device_hosts))
    group = len(groups[0]) if groups else len(device_hosts)
    spans_hosts = any(len({device_hosts[i] for i in g if i < len(device_hosts)}) > 1 for g in groups) \
        if groups else len(set(device_hosts)) > 1
    if kind == "collective-permute":
        return kind, size, spans_hosts
    if group <= 1:
        return None
    share = (group - 1) / group
    wire = {"all-reduce": 2 * share * size, "all-gather": share * size, "reduce-scatter": (group - 1) * size,
            "all-to-all": share * size}[kind]
    return kind, wire, spans_hosts


def _replica_groups(line: str, devices: int) -> list[list[int]]:
    """The device groups of a collective: {{0,1},{2,3}} or the iota form [2,2]<=[4] / [2,2]<=[2,2]T(1,0)."""
    explicit = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line)
    if explicit:
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d, ]*)\}", explicit.group(1))]
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        dims = [int(x) for x in iota.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    return []


def program_cost(compiled, mesh: Mesh, accelerator: Accelerator) -> ProgramCost:
    """FLOPs, HBM bytes and collective traffic of one run of `compiled`, per device (see the module doc).

    XLA's HLO cost analysis gives each computation's cost with its loops' bodies counted once;
    the walk over the module's loops adds each body (trip count - 1) more times, inner loops
    within outer ones. Collectives are read from the program text: ring algorithms, an
    all-reduce sending 2 (g - 1) / g of its bytes over a group of g devices.
    """
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    from jaxlib import _hlo

    entry_module = compiled.runtime_executable().hlo_modules()[0]
    text = entry_module.to_string()
    parsed = HloText.parse(text)
    computations, entry = parsed.computations, parsed.entry
    cpu = xla_bridge.get_backend("cpu")
    once_cache: dict[str, tuple[float, float]] = {}

    def once(name: str) -> tuple[float, float]:
        """(FLOPs, bytes) of computation `name` run once, the loops in it counted once."""
        if name not in once_cache:
            if name == entry:
                module = entry_module
            else:
                # A module of the loop body and what it calls, the body as its entry: parsing the whole program
                # again for every loop took a quarter of a GPT-J-6B plan.
                module = _hlo.hlo_module_from_text(parsed.module_of(name, _reachable(name, computations)))
            analysis = _jax.hlo_module_cost_analysis(cpu, module)
            once_cache[name] = (float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)))
        return once_cache[name]

    # Every computation's runs per step (loops multiply), and the loops' extra body runs.
    runs: dict[str, float] = {entry: 1.0}
    extra_flops = extra_bytes = 0.0
    uncounted = 0
    order = [entry]
    seen_loops = set()
    while order:
        name = order.pop()
        for line in computations.get(name, []):
            callees = _callees(line)
            if " while(" in line:
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trips = _trip_count(line, computations)
                if trips is None:
                    uncounted += 1
                    trips = 1
                key = (name, body)
                if key not in seen_loops:
                    seen_loops.add(key)
                    flops, nbytes = once(body)
                    extra_flops += runs[name] * (trips - 1) * flops
                    extra_bytes += runs[name] * (trips - 1) * nbytes
                runs[body] = runs.get(body, 0.0) + runs[name] * trips
                order.append(body)
                callees = [c for c in callees if c != body]
            for callee in callees:
                if callee in computations and callee not in runs:
                    runs[callee] = runs[name]
                    order.append(callee)
    flops, nbytes = once(entry)
    flops += sum(times * _gemm_flops(computations.get(name, [])) for name, times in runs.items())
    device_hosts = [d.process_index for d in mesh.devices.flat]
    link = host_link = 0.0
    counts: dict[str, float] = {}
    for name, times in runs.items():
        for line in computations.get(name, []):
            found = _collective(line, device_hosts)
            if found is None:
                continue
            kind, wire, spans_hosts = found
            counts[kind] = counts.get(kind, 0) + times
            if spans_hosts and accelerator.platform == "cuda":
                host_link += times * wire
            else:
                link += times * wire
    return ProgramCost(flops + extra_flops, nbytes + extra_bytes, link, host_link,
                       {k: int(v) for k, v in counts.items()}, uncounted)


@dataclasses.dataclass(frozen=True)
class StepBound:
    """The least time a program can take on the target: each resource at its peak, all overlapped."""

    compute_s: float
    memory_s: float
    link_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s, self.link_s)

    @property
    def limited_by(self) -> str:
        return max((self.compute_s, "compute"), (self.memory_s, "HBM bandwidth"),
                   (self.link_s, "interconnect"))[1]


def step_time_bound(cost: ProgramCost, accelerator: Accelerator) -> StepBound:
    """The least time one run of a program with `cost` takes on a device of `accelerator` (see StepBound)."""
    link_s = cost.link_bytes / accelerator.fast_bandwidth
    if cost.host_link_bytes:
        link_s += cost.host_link_bytes / accelerator.slow_bandwidth
    return StepBound(cost.flops / accelerator.peak_flops, cost.bytes_accessed / accelerator.hbm_bandwidth, link_s)


def main(argv=None) -> int:
    """`python -m gptj.targets requirements`: the pip requirements of both compilers (for scripts/install.sh);
    `python -m gptj.targets installed`: exit status 0 when both are installed, in the versions jax asks for."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["requirements"]:
        print(" ".join(compiler_requirements()))
        return 0
    if argv == ["installed"]:
        return 0 if _compilers_current() else 1
    print("usage: python -m gptj.targets requirements|installed", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
