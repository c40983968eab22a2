"""The accelerators we plan and estimate for: one table of their published figures.

`gptj.scaling` estimates a training step on them by name ("tpu_v3", "h100");
`gptj.targets` compiles for the ones a `--target` names (`tpu:v3-8` reads
"tpu_v3", `gpu:h100x8` reads "h100"), with the topology and compiler fields
below. A "device" is what JAX calls one: a TPU v3 core, a TPU v4 or v5p chip
(whose two cores act as one megacore), a v5e or v6e chip, a GPU.

How the figures are read from their sources, so that the rows compare:

* peak FLOP/s are dense bf16;
* `fast_bandwidth` is what one device moves per second in a ring collective
  inside its fast domain: for TPUs Google's "all-reduce bandwidth per pod"
  divided by the pod's devices where it is published (v3, v4, v5e, v6e), else
  the one-way ICI bandwidth per chip; for GPUs one way of NVLink (PCIe for the
  H100 PCIe);
* `slow_bandwidth` is what one device moves per second beyond its fast domain:
  the data-centre network between TPU slices, a GPU's InfiniBand NIC between
  hosts;
* `hbm_bytes`: a TPU's HBM in GiB (Google's "16 GB" v5e chip holds 16 GiB,
  of which its compiler offers 15.75); for GPUs what CUDA reports of the card,
  as XLA's GPU target configs (gptj/target_configs/) give it;
* `compute_efficiency` is not a published figure but `gptj.scaling`'s
  assumption of the fraction of peak the model's matmuls reach (TPU v3's is
  solved from the reference's own v3-32 run; the others are assumed).
"""

from __future__ import annotations

import dataclasses

GB = 10**9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One accelerator generation, per JAX device (see the module docstring for how each figure is read)."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: int
    fast_bandwidth: float
    fast_domain: int  # devices joined by the fast links: a TPU slice's torus at most, a GPU host's NVLink
    slow_bandwidth: float
    platform: str = ""  # "tpu" or "cuda": which compiler gptj.targets loads for it
    compute_efficiency: float = 0.5
    collective_latency: float = 10e-6
    # TPU: the libtpu topology's name prefix, how many cores a Cloud TPU name counts per JAX device,
    # the libtpu chip configuration; GPU: the XLA target config (gptj/target_configs/; none: not a --target).
    topology_prefix: str = ""
    cores_per_device: int = 1
    chip_config: str = "default"
    target_config: str = ""
    sizes: tuple[int, ...] = ()  # the counts sold (Cloud TPU names' numbers; GPUs per host up to a full host)
    source: str = ""


ACCELERATORS: dict[str, Accelerator] = {
    "tpu_v3": Accelerator(
        "TPU v3", peak_flops=61.5e12, hbm_bandwidth=450 * GB, hbm_bytes=16 * GIB, fast_bandwidth=166 * GB,
        fast_domain=2048, slow_bandwidth=3 * GB, platform="tpu", compute_efficiency=0.53, topology_prefix="v3",
        sizes=(8, 32, 64, 128, 256, 512, 1024, 2048),
        source="Cloud TPU v3: 123 TFLOP/s bf16, 32 GiB and 900 GB/s HBM per 2-core chip; 340 TB/s all-reduce "
               "bandwidth per 1024-chip pod (166 GB/s per core); efficiency from the reference's v3-32 6B run"),
    "tpu_v4": Accelerator(
        "TPU v4", peak_flops=275e12, hbm_bandwidth=1200 * GB, hbm_bytes=32 * GIB, fast_bandwidth=268 * GB,
        fast_domain=4096, slow_bandwidth=6 * GB, platform="tpu", compute_efficiency=0.55, topology_prefix="v4",
        cores_per_device=2, chip_config="megacore", sizes=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
        source="Cloud TPU v4: 275 TFLOP/s bf16, 32 GiB and 1200 GB/s HBM per chip (one megacore device); "
               "1.1 PB/s all-reduce bandwidth per 4096 chips"),
    "tpu_v5e": Accelerator(
        "TPU v5e", peak_flops=197e12, hbm_bandwidth=819 * GB, hbm_bytes=16 * GIB, fast_bandwidth=200 * GB,
        fast_domain=256, slow_bandwidth=3.125 * GB, platform="tpu", topology_prefix="v5e",
        sizes=(1, 4, 8, 16, 32, 64, 128, 256),
        source="Cloud TPU v5e: 197 TFLOP/s bf16, 16 GiB and 819 GB/s HBM per chip; 51.2 TB/s all-reduce bandwidth "
               "per 256-chip pod (1,600 Gbps ICI per chip); 6.4 Tbps data-centre network per pod (two 100 Gbps "
               "NICs per 8-chip host)"),
    "tpu_v5p": Accelerator(
        "TPU v5p", peak_flops=459e12, hbm_bandwidth=2765 * GB, hbm_bytes=95 * GIB, fast_bandwidth=600 * GB,
        fast_domain=6144, slow_bandwidth=6.25 * GB, platform="tpu", topology_prefix="v5p", cores_per_device=2,
        chip_config="megacore", sizes=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
        source="Cloud TPU v5p: 459 TFLOP/s bf16, 95 GiB and 2,765 GB/s HBM per chip (one megacore device); "
               "ICI 1,200 GB/s both ways per chip; slices up to 6144 chips; 50 Gbps data-centre network per chip"),
    "tpu_v6e": Accelerator(
        "TPU v6e", peak_flops=918e12, hbm_bandwidth=1640 * GB, hbm_bytes=32 * GIB, fast_bandwidth=400 * GB,
        fast_domain=256, slow_bandwidth=6.25 * GB, platform="tpu", topology_prefix="v6e",
        sizes=(1, 4, 8, 16, 32, 64, 128, 256),
        source="Cloud TPU v6e (Trillium): 918 TFLOP/s bf16, 32 GiB and 1,640 GB/s HBM per chip; 102.4 TB/s "
               "all-reduce bandwidth per 256-chip pod (ICI 800 GB/s both ways per chip); data-centre network "
               "assumed at v5p's 50 Gbps per chip"),
    "a100": Accelerator(
        "NVIDIA A100 SXM 80GB", peak_flops=312e12, hbm_bandwidth=2039 * GB, hbm_bytes=80 * GB,
        fast_bandwidth=300 * GB, fast_domain=8, slow_bandwidth=25 * GB, platform="cuda",
        source="NVIDIA A100 datasheet: 312 TFLOP/s dense bf16, 80 GB HBM2e at 2,039 GB/s; NVLink 3 600 GB/s both "
               "ways; one 200 Gb/s NIC per GPU between hosts"),
    "h100": Accelerator(
        "NVIDIA H100 SXM", peak_flops=989e12, hbm_bandwidth=3352 * GB, hbm_bytes=84942979072,
        fast_bandwidth=450 * GB, fast_domain=8, slow_bandwidth=50 * GB, platform="cuda", compute_efficiency=0.45,
        target_config="h100_sxm.txtpb", sizes=(1, 2, 4, 8),
        source="NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s (XLA's target config: "
               "79.11 GiB to use, 3,352 GB/s); NVLink 4 900 GB/s both ways; one 400 Gb/s InfiniBand NIC per GPU "
               "between hosts"),
    "h100-pcie": Accelerator(
        "NVIDIA H100 PCIe", peak_flops=756e12, hbm_bandwidth=2039 * GB, hbm_bytes=84942979072,
        fast_bandwidth=64 * GB, fast_domain=8, slow_bandwidth=50 * GB, platform="cuda", compute_efficiency=0.45,
        target_config="h100_pcie.txtpb", sizes=(1, 2, 4, 8),
        source="NVIDIA H100 PCIe datasheet: 756 TFLOP/s dense bf16, 80 GB HBM2e at 2.0 TB/s (XLA's target config: "
               "79.11 GiB to use, 2,039 GB/s); PCIe Gen5 x16 64 GB/s each way between GPUs; 400 Gb/s InfiniBand "
               "between hosts"),
    "h200": Accelerator(
        "NVIDIA H200 SXM", peak_flops=989e12, hbm_bandwidth=4800 * GB, hbm_bytes=151397597184,
        fast_bandwidth=450 * GB, fast_domain=8, slow_bandwidth=50 * GB, platform="cuda", compute_efficiency=0.45,
        target_config="h200.txtpb", sizes=(1, 2, 4, 8),
        source="NVIDIA H200 SXM datasheet: H100's compute, 141 GB HBM3e at 4.8 TB/s (XLA's target config: 141 GiB "
               "to use); NVLink 4; 400 Gb/s InfiniBand per GPU between hosts"),
}


def accelerator(name: str | Accelerator) -> Accelerator:
    """The accelerator named `name` ("tpu_v3", "h100", ...; one given is returned); ValueError names the others."""
    if isinstance(name, Accelerator):
        return name
    if name not in ACCELERATORS:
        raise ValueError(f"unknown hardware {name!r}; choose one of {sorted(ACCELERATORS)}")
    return ACCELERATORS[name]
