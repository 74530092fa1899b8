"""What one device of each kind can do: peak dense FLOP/s per dtype, memory, bandwidth, dtypes, fp8 format.

The planner's cost model and the per-site dtype policy read this table. Numbers are per JAX device
(what `jax.devices()` lists): for the MI250X that is one GCD, half of the package on the spec sheet.
Lookups take the string JAX reports (`device.device_kind`, e.g. "NVIDIA H100 80GB HBM3",
"TPU v5 lite", "cpu") or a topology's short name ("H100", "Ascend910B", "MI300X"); an unknown kind
gets a conservative default with `known=False` instead of an error, so new hardware still runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import MappingProxyType

from hxtrain.backends._registry import BackendError

DTYPES = ("float32", "bfloat16", "float16", "float8")
_T = 1e12  # TFLOP/s -> FLOP/s


@dataclass(frozen=True)
class Capability:
    """Peak numbers for one device of one kind. FLOP/s are dense (no sparsity); None = not supported."""

    name: str  # canonical kind, e.g. "NVIDIA H100 SXM"
    platform: str  # hxtrain backend: cpu, cuda, rocm, tpu, ascend
    flops_fp32: float
    flops_bf16: float | None
    flops_fp16: float | None
    flops_fp8: float | None
    hbm_gib: float  # device memory; vendors' "80GB" HBM is 80 GiB of stacks (~79.6 GiB usable)
    bandwidth_gbs: float  # memory bandwidth, GB/s
    fp8_format: str | None  # "e4m3fn" (NVIDIA/OCP), "e4m3fnuz" (AMD MI300); None = no fp8 compute
    source: str  # where the numbers come from; "estimate" marks guesses
    known: bool = True  # False: the lookup did not recognise the kind and returned the default

    @property
    def dtypes(self) -> tuple[str, ...]:
        """Compute dtypes this device runs natively, widest first, e.g. ('float32', 'bfloat16', 'float16')."""
        return tuple(d for d, f in zip(DTYPES, (self.flops_fp32, self.flops_bf16, self.flops_fp16,
                                                self.flops_fp8)) if f is not None)

    def supports(self, dtype: str) -> bool:
        return dtype in self.dtypes

    def peak_flops(self, dtype: str) -> float:
        """Peak dense FLOP/s in `dtype` (one of DTYPES); BackendError if the device lacks it."""
        if dtype not in DTYPES:
            raise BackendError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        flops = {"float32": self.flops_fp32, "bfloat16": self.flops_bf16,
                 "float16": self.flops_fp16, "float8": self.flops_fp8}[dtype]
        if flops is None:
            raise BackendError(f"device {self.name!r} has no {dtype} compute (it supports {', '.join(self.dtypes)})")
        return flops

    def summary(self) -> str:
        """One line for `hxtrain info`, e.g. 'NVIDIA H100 SXM: 989 TF bf16, 80 GiB, 3350 GB/s, fp8 e4m3fn'."""
        best = max((d for d in self.dtypes if d != "float8"), key=self.peak_flops)
        fp8 = f", fp8 {self.fp8_format}" if self.fp8_format else ""
        flag = "" if self.known else " (unknown kind: conservative default)"
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[best]
        return (f"{self.name}: {self.peak_flops(best) / _T:g} TF {short}, {self.hbm_gib:g} GiB, "
                f"{self.bandwidth_gbs:g} GB/s{fp8}{flag}")


def _cap(name, platform, fp32, bf16, fp16, fp8, hbm, bw, fp8_format, source):
    t = lambda x: None if x is None else x * _T  # noqa: E731
    return Capability(name, platform, t(fp32), t(bf16), t(fp16), t(fp8), hbm, bw, fp8_format, source)


_SPEC = "vendor spec sheet, dense"
# Peak TFLOP/s (dense: NVIDIA and AMD quote "with sparsity" at 2x), HBM GiB, GB/s. NVIDIA fp32 is the
# CUDA-core rate (TF32 tensor cores are faster but not fp32); AMD fp32 is the matrix-core rate; TPUs
# quote bf16 only, so their fp32 is an estimate (3-pass bf16, XLA's Precision.HIGH). Huawei publishes
# little: Ascend numbers come from Huawei's 910 launch material and public reporting on the 910B.
CAPABILITIES: MappingProxyType[str, Capability] = MappingProxyType({c.name: c for c in (
    #    name                 platform   fp32   bf16    fp16    fp8    HBM  GB/s   fp8 format  source
    _cap("cpu",               "cpu",     0.1,   0.05,   0.05,   None,  16,  20,    None,
         "estimate: a modest multi-core x86 host; bf16/fp16 are emulated. Not measured"),
    _cap("NVIDIA A100 SXM",   "cuda",    19.5,  312,    312,    None,  80,  2039,  None,       _SPEC),
    _cap("NVIDIA H100 SXM",   "cuda",    67,    989,    989,    1979,  80,  3350,  "e4m3fn",   _SPEC),
    _cap("NVIDIA H100 PCIe",  "cuda",    51,    756,    756,    1513,  80,  2000,  "e4m3fn",   _SPEC),
    _cap("NVIDIA H200",       "cuda",    67,    989,    989,    1979,  141, 4800,  "e4m3fn",   _SPEC),
    _cap("NVIDIA B200",       "cuda",    75,    2250,   2250,   4500,  180, 8000,  "e4m3fn",   _SPEC),
    _cap("AMD MI250X",        "rocm",    47.9,  191.5,  191.5,  None,  64,  1638,  None,
         _SPEC + "; per GCD (JAX shows each MI250X as 2 devices)"),
    _cap("AMD MI300X",        "rocm",    163.4, 1307.4, 1307.4, 2614.9, 192, 5300, "e4m3fnuz", _SPEC),
    _cap("TPU v4",            "tpu",     91.7,  275,    None,   None,  32,  1200,  None,       _SPEC + "; fp32 estimated"),
    _cap("TPU v5e",           "tpu",     65.7,  197,    None,   None,  16,  819,   None,       _SPEC + "; fp32 estimated"),
    _cap("TPU v5p",           "tpu",     153,   459,    None,   None,  95,  2765,  None,       _SPEC + "; fp32 estimated"),
    _cap("TPU v6e",           "tpu",     306,   918,    None,   None,  32,  1640,  None,       _SPEC + "; fp32 estimated"),
    _cap("Ascend 910A",       "ascend",  64,    None,   256,    None,  32,  1200,  None,
         "Huawei launch material (fp16 256 TF); fp32 estimated; no bf16 on 910A"),
    _cap("Ascend 910B",       "ascend",  78,    313,    313,    None,  64,  1600,  None,
         "public reporting on 910B (varies by bin B1-B4); fp32 estimated"),
)})

# Unknown hardware: assume little (fp32 only, modest speed and memory) so plans stay feasible.
_DEFAULT = Capability("unknown", "unknown", 10 * _T, None, None, None, 16, 500, None,
                      "conservative default for an unrecognised device kind", known=False)

# Normalised key (lower-case alphanumerics) -> table name. Longest key wins, so "tpuv5lite" beats
# "tpuv5" and "ascend910b" beats "ascend910". Keys cover JAX's device_kind strings and topology names.
_KEYS = MappingProxyType({
    "cpu": "cpu", "a100": "NVIDIA A100 SXM", "h100": "NVIDIA H100 SXM", "h100pcie": "NVIDIA H100 PCIe",
    "h200": "NVIDIA H200", "b200": "NVIDIA B200", "mi250x": "AMD MI250X", "mi250": "AMD MI250X",
    "mi300x": "AMD MI300X", "gfx90a": "AMD MI250X", "gfx942": "AMD MI300X",
    "tpuv4": "TPU v4", "tpuv5lite": "TPU v5e", "tpuv5e": "TPU v5e",
    "tpuv5": "TPU v5p", "tpuv5p": "TPU v5p", "tpuv6lite": "TPU v6e", "tpuv6e": "TPU v6e",
    "ascend910": "Ascend 910A", "ascend910a": "Ascend 910A", "910a": "Ascend 910A",
    "ascend910b": "Ascend 910B", "910b": "Ascend 910B",
})


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def capability_for(device_kind: str) -> Capability:
    """The Capability of a device kind, matched loosely; unknown kinds get a default with known=False.

    `capability_for("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"`;
    `capability_for("Ascend910B3").name == "Ascend 910B"`; `capability_for("XPU 9").known is False`.
    """
    if not isinstance(device_kind, str):
        raise BackendError(f"device_kind must be a string such as 'NVIDIA H100 80GB HBM3', got {device_kind!r}")
    norm = _norm(device_kind)
    for key in sorted(_KEYS, key=len, reverse=True):
        if key in norm:
            cap = CAPABILITIES[_KEYS[key]]
            if cap.name == "NVIDIA A100 SXM" and "40gb" in norm:  # the first A100s: less and slower HBM
                cap = replace(cap, name="NVIDIA A100 40GB", hbm_gib=40, bandwidth_gbs=1555)
            return cap
    return replace(_DEFAULT, name=f"unknown ({device_kind})")
