"""Per-site dtype policy and the dtype that crosses a link between two sites.

Master weights stay float32 everywhere (optimizer updates in 16 bits drift); the matmuls run in the
fastest 16-bit float the device has (bf16, or fp16 on the Ascend 910A which lacks bf16); CPU stays in
float32 by default because its bf16 is emulated and slower, and tests compare against fp32 references.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from hxtrain.backends._capabilities import Capability
from hxtrain.backends._registry import BackendError
from hxtrain.links.codecs import CODEC_NAMES
from hxtrain.config.checks import COMPUTE_DTYPES  # the one list (a topology's compute_dtype)

_DTYPE_ALIASES = MappingProxyType({"fp32": "float32", "f32": "float32", "bf16": "bfloat16",
                                   "fp16": "float16", "f16": "float16", "half": "float16"})
_FP8_DTYPES = MappingProxyType({"e4m3fn": "float8_e4m3fn", "e4m3fnuz": "float8_e4m3fnuz"})


@dataclass(frozen=True)
class DtypePolicy:
    """Dtype names (as jnp.dtype takes them) one site uses.

    param_dtype: master weights and optimizer state (always float32).
    compute_dtype: activations and matmuls inside the site's programs.
    wire_dtype: what the site's activations are when they leave it, before any link codec.
    """

    param_dtype: str
    compute_dtype: str
    wire_dtype: str


def dtype_policy(capability: Capability, override: str | None = None) -> DtypePolicy:
    """The dtype policy of a site whose devices have `capability`.

    `override` ("float32" | "bfloat16" | "float16", or "fp32"/"bf16"/"fp16") replaces the default
    compute dtype after checking that the device supports it.
    """
    if override is None:
        if capability.platform == "cpu":
            compute = "float32"  # emulated 16-bit floats are slower on CPU, and fp32 matches the test oracle
        else:
            compute = next((d for d in ("bfloat16", "float16") if capability.supports(d)), "float32")
    else:
        if not isinstance(override, str):
            raise BackendError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {override!r}")
        compute = _DTYPE_ALIASES.get(override.lower(), override.lower())
        if compute not in COMPUTE_DTYPES:
            raise BackendError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {override!r}")
        if not capability.supports(compute):
            raise BackendError(f"compute_dtype {compute!r} is not supported by device {capability.name!r} "
                               f"(it supports {', '.join(d for d in capability.dtypes if d in COMPUTE_DTYPES)}); "
                               "pick one of those or leave compute_dtype unset")
    return DtypePolicy(param_dtype="float32", compute_dtype=compute, wire_dtype=compute)


def link_wire_dtype(a: Capability, b: Capability, codec: str = "none") -> str:
    """The dtype tensors take on a link between devices `a` and `b` that requests `codec`.

    The narrowest dtype both ends support among those the codec allows, falling back to float32:
    "none" -> float32 (nothing lossy on the wire); "bf16" -> bfloat16; "int8" -> int8 (a per-row
    scale travels alongside, any device decodes it); "fp8" -> the fp8 format both ends share
    (NVIDIA e4m3fn and AMD e4m3fnuz differ: byte 0x80 is -0 in one and NaN in the other, so a
    mixed link does not use fp8), else bfloat16, else float16.
    """
    if codec not in CODEC_NAMES:
        raise BackendError(f"link codec must be one of {CODEC_NAMES}, got {codec!r}")
    if codec == "int8":
        return "int8"
    candidates: list[str] = []
    if codec == "fp8":
        if a.fp8_format is not None and a.fp8_format == b.fp8_format:
            candidates.append(_FP8_DTYPES[a.fp8_format])
        candidates += ["bfloat16", "float16"]
    elif codec == "bf16":
        candidates.append("bfloat16")
    for dtype in candidates:
        if dtype.startswith("float8") or (a.supports(dtype) and b.supports(dtype)):
            return dtype
    return "float32"
