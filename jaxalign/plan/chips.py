"""TPU chips and slices (and one NVIDIA GPU): published figures per chip, slice names, and
compile-only devices.

    topology = chips.topology("v5e-16")          # Topology(name, chip=CHIPS["v5e"], chips=16, ...)
    devices = chips.compile_only_devices(topology)  # 16 devices of the TPU compiler, no TPU needed

A slice is named as Cloud TPU names it, `<generation>-<N>`: N counts TensorCores, which is the
number of chips for v5e and v6e (one core per chip) and twice the number of chips for v4 and v5p
(two cores per chip, run as one "megacore" device, as JAX does on those chips). So v5e-16 is 16
chips, v5p-8 and v4-8 are 4 chips. The devices come from libtpu's compile-only topologies
(`jax.experimental.topologies.get_topology_desc`), the same slice shapes as MaxText's
`accelerator_to_spec_map.py` uses for its ahead-of-time compilation.

Chip figures, each from the vendor's page for that chip (per chip; HBM in GiB as a compiled
plan's bytes are compared with it):

| chip | bf16 peak | HBM | HBM bandwidth | ICI (bidirectional, per chip) | source |
|---|---|---|---|---|---|
| v4 | 275 TFLOP/s | 32 GiB | 1200 GB/s | 540 GB/s (6 links x 90 GB/s) | https://cloud.google.com/tpu/docs/v4 ; links: https://jax-ml.github.io/scaling-book/tpus/ |
| v5e | 197 TFLOP/s | 16 GB | 819 GB/s | 400 GB/s | https://cloud.google.com/tpu/docs/v5e |
| v5p | 459 TFLOP/s | 95 GiB | 2765 GB/s | 1200 GB/s | https://cloud.google.com/tpu/docs/v5p |
| v6e | 918 TFLOP/s | 32 GB | 1638 GB/s | 800 GB/s | https://cloud.google.com/tpu/docs/v6e |

| h100 | 989 TFLOP/s (dense) | 79.1 GiB | 3350 GB/s | 900 GB/s (NVLink) | https://www.nvidia.com/en-us/data-center/h100/ |

h100-N is N H100 SXM GPUs of one host (N = 1, 2, 4, 8), compiled by jax's CUDA plugin without a GPU
(`pip install 'jax[cuda12]==0.10.2'`): the plugin's compile-only topology takes the GPU's description
(H100_TARGET_CONFIG, XLA's xla/backends/gpu/target_config/specs/h100_sxm.txtpb with the fields this
jaxlib reads); its HBM is the device_memory_size there.

The v4 page gives no per-chip ICI figure; 540 GB/s is its 6 links times the 9e10 B/s bidirectional
per link of the JAX scaling book (whose per-link figures reproduce the vendor's per-chip ICI of
v5e, v5p and v6e). The v5e and v6e pages say "16 GB" / "32 GB"; the capacity taken here is
16 GiB / 32 GiB, what the chips expose to XLA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures of one TPU generation."""

    name: str  # v4 | v5e | v5p | v6e
    device_kind: str  # jax Device.device_kind of its compile-only devices
    bf16_flops: float  # peak bf16 FLOP/s per chip
    hbm_bytes: int  # HBM capacity per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float  # bidirectional inter-chip bytes/s per chip (all links)
    cores_per_chip: int  # TensorCores per chip (the N of a slice name counts these)
    three_d: bool  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    source: str  # the vendor's page
    platform: str = "tpu"  # tpu | cuda

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / GIB


CHIPS = {
    "v4": ChipSpec("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, 540e9, 2, True,
                   "https://cloud.google.com/tpu/docs/v4 (ICI: 6 links x 9e10 B/s, "
                   "https://jax-ml.github.io/scaling-book/tpus/)"),
    "v5e": ChipSpec("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 400e9, 1, False,
                    "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 1200e9, 2, True,
                    "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1638e9, 800e9, 1, False,
                    "https://cloud.google.com/tpu/docs/v6e"),
    "h100": ChipSpec("h100", "NVIDIA H100 80GB HBM3", 989.4e12, 84942979072, 3.35e12, 900e9, 1, False,
                     "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM)", platform="cuda"),
}
GPU_COUNTS = (1, 2, 4, 8)  # GPUs of one HGX host

# XLA's description of an H100 SXM (openxla/xla xla/backends/gpu/target_config/specs/h100_sxm.txtpb),
# the fields jaxlib 0.10.2's GpuTargetConfigProto reads.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 8 minor: 9 patch: 4 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# chips -> slice shape (Cloud TPU's supported single-slice shapes)
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
# libtpu's generation names in a topology string
_LIBTPU_NAME = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}

TPU_EXTRA = "pip install 'jaxalign[tpu]'"
CUDA_EXTRA = "pip install 'jax[cuda12]==0.10.2'"


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its Cloud TPU name, chip, chip count and libtpu topology."""

    name: str  # e.g. v5e-16
    chip: ChipSpec
    chips: int
    shape: str  # e.g. 4x4, 2x2x1

    @property
    def libtpu_name(self) -> str:
        """The get_topology_desc name, e.g. "v5e:4x4"."""
        return f"{_LIBTPU_NAME[self.chip.name]}:{self.shape}"

    @property
    def hosts(self) -> int:
        """Hosts of the slice (8 chips per host for v5e / v6e slices of 8+, 4 for v4 / v5p; one GPU host)."""
        per_host = 4 if self.chip.three_d else 8
        return max(1, self.chips // per_host)

    def options(self) -> dict:
        """get_topology_desc keyword options: megacore chips for v4 / v5p; host bounds; wraparound
        links on full 4x4x4 cubes (v4 / v5p slices of 64+ chips); a GPU's description."""
        if self.chip.platform == "cuda":
            return dict(topology=f"1x1x{self.chips}", target_config=H100_TARGET_CONFIG)
        if self.chip.three_d:
            wrap = self.chips >= 64
            return dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), wrap=(wrap,) * 3)
        return dict(chips_per_host_bounds=(1, 1, 1) if self.chips == 1 else (2, 2, 1))


def _shapes(chip: ChipSpec) -> dict[int, str]:
    if chip.platform == "cuda":
        return {n: f"1x1x{n}" for n in GPU_COUNTS}
    return _SHAPES_3D if chip.three_d else _SHAPES_2D


def topology_names() -> list[str]:
    """Every valid slice name, e.g. ["v4-8", ..., "v6e-256", "h100-1", ..., "h100-8"]."""
    return [f"{chip.name}-{chips * chip.cores_per_chip}" for chip in CHIPS.values() for chips in _shapes(chip)]


def topology(name: str) -> Topology:
    """The slice named `name` (v5e-16, v5p-8, v4-8, v6e-8, h100-8, ...); ValueError listing the valid names."""
    generation, _, count = name.partition("-")
    chip = CHIPS.get(generation)
    if chip is not None and count.isdigit():
        chips = int(count) // chip.cores_per_chip
        shape = _shapes(chip).get(chips)
        if shape is not None and chips * chip.cores_per_chip == int(count):
            return Topology(name, chip, chips, shape)
    raise ValueError(f"--topology {name!r}: unknown slice; valid: {', '.join(topology_names())}")


def has_libtpu() -> bool:
    """Whether libtpu (the TPU compiler) is installed."""
    return importlib.util.find_spec("libtpu") is not None


def has_cuda_plugin() -> bool:
    """Whether jax's CUDA plugin (the GPU compiler) is installed."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def check_compiler(topo: Topology) -> None:
    """ValueError naming what to install when the slice's compiler is missing."""
    if topo.chip.platform == "cuda" and not has_cuda_plugin():
        raise ValueError(f"compiling for an NVIDIA GPU needs jax's CUDA plugin, which is not installed: {CUDA_EXTRA}")
    if topo.chip.platform == "tpu" and not has_libtpu():
        raise ValueError(f"compiling for a TPU needs libtpu, which is not installed: {TPU_EXTRA}")


def compile_only_host(accelerator_type: str = "v5e-1") -> None:
    """Set this process up to compile for a slice it is not on (call before any JAX backend starts):
    libtpu asks the machine which TPU it is on and where its workers are, so tell it; JAX's own
    backend stays the CPU (the CUDA plugin would look for a GPU driver)."""
    import jax

    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    jax.config.update("jax_platforms", "cpu")


def compile_only_devices(topo: Topology) -> list:
    """The slice's compile-only devices (a mesh of them compiles for the slice; nothing runs).

    Several processes may load libtpu at once (ALLOW_MULTIPLE_LIBTPU_LOAD): a plan never runs on a
    TPU, and another jax process of the machine may hold libtpu's lock file. A GPU plan needs jax's
    platforms to exclude cuda (`jax.config.update("jax_platforms", "cpu")` before any backend starts),
    or the CUDA plugin looks for a GPU driver."""
    check_compiler(topo)
    from jax.experimental import topologies

    if topo.chip.platform == "cuda":
        devices = topologies.get_topology_desc(topology_name="", platform="cuda", **topo.options()).devices
    else:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        devices = topologies.get_topology_desc(topology_name=topo.libtpu_name, platform="tpu",
                                               **topo.options()).devices
    if len(devices) != topo.chips or devices[0].device_kind != topo.chip.device_kind:
        raise ValueError(f"{topo.name}: libtpu gave {len(devices)} x {devices[0].device_kind!r}, expected "
                         f"{topo.chips} x {topo.chip.device_kind!r}")
    return list(devices)


def ici_seconds(topo: Topology, bytes_per_chip: float) -> float:
    """Time for each chip to receive `bytes_per_chip` over its inter-chip links: half the published
    bidirectional bandwidth comes in (every link busy: an optimistic bound)."""
    return bytes_per_chip / (topo.chip.ici_bandwidth / 2) if bytes_per_chip else 0.0


def smallest_slices(chip: ChipSpec, min_chips: int = 1) -> list[Topology]:
    """The slices of `chip` with at least min_chips chips, smallest first."""
    shapes = _shapes(chip)
    return [Topology(f"{chip.name}-{n * chip.cores_per_chip}", chip, n, shape)
            for n, shape in sorted(shapes.items()) if n >= max(1, min_chips)]


