"""The GPU facts every estimate uses, in one table: memory, dense peaks and bandwidths.

Read by the MFU estimate of a running job (``components/health.py``), ``mone-plan``'s plan
(``planning/plan.py``) and the layout search's cost model (``planning/layout_search.py``).
Figures are the vendors' datasheet numbers for the SXM parts (dense, no sparsity); bandwidths
are per GPU and direction as collectives achieve them (NCCL bus bandwidth), not the links'
nominal figures. This module imports nothing, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Hardware:
    """One GPU type. ``gemm_efficiency`` is the share of the peak large bf16 GEMMs reach in
    practice; a GPU without link figures can be planned for but not searched over."""

    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16
    tf32_tflops: float  # dense TF32 (fp32 matmuls with TF32 allowed)
    fp32_tflops: float  # dense fp32 without TF32
    gemm_efficiency: float
    hbm_gbps: float  # GB/s
    nvlink_gbps: float | None = None  # GB/s, inside a node
    network_gbps: float | None = None  # GB/s, between nodes (one NIC per GPU)

    @property
    def searchable(self) -> bool:
        """Whether the layout search has the link bandwidths it needs for this GPU."""
        return self.nvlink_gbps is not None and self.network_gbps is not None

    def peak(self, precision: str) -> float:
        """Dense peak TFLOP/s for ``precision`` (``bf16``, ``tf32`` or ``fp32``)."""
        return {"bf16": self.peak_tflops, "tf32": self.tf32_tflops, "fp32": self.fp32_tflops}[
            precision
        ]


GPUS = {
    # A100 SXM 80 GB: NVLink3 600 GB/s both ways; HDR InfiniBand 200 Gb/s per GPU
    "A100": Hardware("A100", 80.0, 312.0, 156.0, 19.5, 0.70, 2039.0, 230.0, 23.0),
    # H100 SXM 80 GB: NVLink4 900 GB/s both ways; NDR InfiniBand 400 Gb/s per GPU
    "H100": Hardware("H100", 80.0, 989.0, 494.5, 66.9, 0.70, 3350.0, 360.0, 45.0),
    # H200 SXM 141 GB: H100's compute and links, more and faster memory
    "H200": Hardware("H200", 141e9 / GIB, 989.0, 494.5, 66.9, 0.70, 4800.0, 360.0, 45.0),
    # B200 180 GB: NVLink5 1.8 TB/s both ways; 400 Gb/s per GPU
    "B200": Hardware("B200", 180e9 / GIB, 2250.0, 1100.0, 80.0, 0.65, 8000.0, 720.0, 45.0),
    # L40S 48 GB (PCIe, no NVLink): planned for, not searched over
    "L40S": Hardware("L40S", 48.0, 362.0, 183.0, 91.6, 0.70, 864.0),
}
DEFAULT_GPU = "H100"


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of the known GPU whose name ``device_name`` contains, or None."""
    for name, hw in GPUS.items():
        if name in device_name:
            return hw.peak(precision)
    return None
