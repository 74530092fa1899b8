"""Cost model: FLOPs, time and memory of a transformer's parts on a site, and bytes on a link.

Pure Python (no JAX): the planner calls it thousands of times per plan. Every figure is per *microbatch*
of `b` sequences of `T` tokens, for a site running `data x tensor` devices (each data replica sees `b / data`
sequences, split over `tensor` devices).

Formulas (D d_model, F d_ff, H heads, V vocabulary, T sequence, a bytes per activation element; Dkv = D Hkv / H
the width of k and v with Hkv kv heads, D for multi-head attention; m = 3 matrices for a gated (SwiGLU) MLP, else 2):

- block parameters      2 D^2 + 2 D Dkv + m D F  +  9 D + F (GPT: biases, two LayerNorms; `models/gpt.py`)
                        or 2 D (+ 2 D / H with qk_norm) (Llama: two RMSNorms; `models/llama.py`), exactly what
                        those models build; 4 D^2 + 2 D F + 9 D + F for GPT;
- block forward FLOPs   2 T (2 D^2 + 2 D Dkv + m D F)  +  4 T^2 D       per sequence (matmuls + QK^T and PV; the
                        causal mask saves nothing because the scores are computed in full);
- backward              input-grad = matmul part + 2 x attention part, weight-grad = matmul part, so the whole
                        backward is about 2 x forward; with recompute the backward also re-runs the forward;
- head forward FLOPs    2 T D V per sequence (logits; softmax and loss are O(T V) and ignored) on the last stage;
  the embedding is a gather (no FLOPs) on the first stage;
- time on a site        FLOPs / (data x tensor x peak(dtype) x efficiency)  +  tensor-parallel all-reduces;
- tensor parallel       Megatron-style: 2 all-reduces of the block's [b/data, T, D] activation in the forward
                        and 2 in the backward, each a ring all-reduce: 2 (t-1)/t x bytes / intra-node bandwidth;
- data parallel         once per step, a ring all-reduce of the stage's fp32 gradients (sharded over tensor) over
                        the data replicas: 2 (d-1)/d x 4 P / t / inter-node bandwidth; the planner hides the part
                        that overlaps the last microbatch's backward;
- memory per device     16 bytes per parameter (fp32 weight, gradient, Adam m and v) / tensor, plus the stored
                        activations of every live microbatch: per token and block (7 D + 2 Dkv + (m F) + H T) a
                        bytes (norm in/out, q, k, v, attention output, the MLP's hidden values: before and after
                        GELU, or gate, up and their product; softmax probabilities; Korthikanti et al. 2022 without
                        dropout), of which everything but the 4 D norm values is sharded over tensor; with recompute only the block input (D a) is
                        kept, plus one block's full set while it is recomputed;
- link time             latency + bytes / bandwidth, bytes = b T D x wire bytes of the codec (`wire_bytes`).

Measured times (`SiteProfile`, from `hxtrain profile`) replace the FLOP estimate for a site's blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Wire bytes per element of a boundary tensor, and bytes of scale per row (one row = one token's D values).
# "none" sends the executor's fp32 activations as they are.
CODEC_BYTES: dict[str, tuple[float, float]] = {"none": (4.0, 0.0), "bf16": (2.0, 0.0), "int8": (1.0, 4.0),
                                               "fp8": (1.0, 4.0)}
# Bytes per element of stored activations and TP all-reduces, by compute dtype.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


class CostModelError(ValueError):
    """A model config or hardware description the cost model cannot use; the message names the field."""


@dataclass(frozen=True)
class Assumptions:
    """The constants of the estimate, in one place so that a report can print them and a user can change them.

    `efficiency` is the fraction of peak FLOP/s a well-tuned stage program reaches (0.4 is a typical MFU for
    large transformer training); `tp_bandwidth_GBps` the per-device all-reduce bus bandwidth inside a node
    (NCCL-style bus bandwidth over NVLink 4 / xGMI / HCCS measures ~300-450 GB/s on 8-device nodes; 300 is the
    low end); `dp_bandwidth_GBps` the per-device all-reduce bandwidth between nodes of one site (a 400 Gbit/s NIC
    per device at ~80%); `memory_fraction` the share of
    device memory the planner may fill (the rest goes to the framework, fragmentation and temporaries);
    `task_overhead_s` the host's cost of dispatching one task program (MPMD: one dispatch per task, see DESIGN).
    """

    efficiency: float = 0.4
    tp_bandwidth_GBps: float = 300.0
    dp_bandwidth_GBps: float = 40.0
    optimizer_bytes_per_param: float = 16.0
    grad_bytes: float = 4.0
    memory_fraction: float = 0.9
    task_overhead_s: float = 1e-4

    def __post_init__(self):
        for f in ("efficiency", "memory_fraction"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise CostModelError(f"Assumptions.{f}: expected a number in (0, 1], got {v!r}")
        for f in ("tp_bandwidth_GBps", "dp_bandwidth_GBps", "optimizer_bytes_per_param", "grad_bytes"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0):
                raise CostModelError(f"Assumptions.{f}: expected a positive number, got {v!r}")
        if not (isinstance(self.task_overhead_s, (int, float)) and self.task_overhead_s >= 0):
            raise CostModelError(f"Assumptions.task_overhead_s: expected seconds >= 0, got {self.task_overhead_s!r}")


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs, read once from any config-like object (GPTConfig, LlamaConfig or a
    look-alike). `n_kv_heads` None means n_heads (multi-head attention); `gated_mlp` a SwiGLU MLP (3 matrices);
    `learned_positions` a [seq_len, D] position table in the embedding; `biases` GPT-style biased projections and
    LayerNorms (else bias-free projections and RMSNorms, with `qk_norm` scales over head_dim)."""

    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    vocab_size: int
    seq_len: int
    tie_embeddings: bool = False
    n_kv_heads: int | None = None
    gated_mlp: bool = False
    learned_positions: bool = True
    biases: bool = True
    qk_norm: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)

    @classmethod
    def of(cls, cfg) -> ModelShape:
        """Duck-typed: `cfg` needs d_model, n_heads, n_layers, d_ff, vocab_size, seq_len; n_kv_heads (default
        n_heads), tie_embeddings, gated_mlp, qk_norm (default False), learned_positions, biases (default True)
        are optional."""
        if isinstance(cfg, ModelShape):
            return cfg
        vals = {}
        for f in ("d_model", "n_heads", "n_layers", "d_ff", "vocab_size", "seq_len"):
            v = getattr(cfg, f, None)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CostModelError(f"model config {type(cfg).__name__}.{f}: expected a positive integer, "
                                     f"got {v!r}; the cost model needs {f} to size the transformer")
            vals[f] = v
        kv = getattr(cfg, "n_kv_heads", None)
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or vals["n_heads"] % kv):
            raise CostModelError(f"model config {type(cfg).__name__}.n_kv_heads: expected a positive divisor of "
                                 f"n_heads = {vals['n_heads']}, got {kv!r}")
        flags = {f: bool(getattr(cfg, f, default)) for f, default in (
            ("tie_embeddings", False), ("gated_mlp", False), ("learned_positions", True), ("biases", True),
            ("qk_norm", False))}
        return cls(**vals, n_kv_heads=kv, **flags)

    @property
    def kv_width(self) -> int:
        """Width of the k and v projections: D for multi-head attention, D Hkv / H for grouped-query."""
        return self.d_model * self.n_kv_heads // self.n_heads

    def splits_over(self, tensor: int) -> bool:
        """Whether tensor parallelism of size `tensor` divides the heads, the kv heads and the MLP width."""
        return not (self.n_heads % tensor or self.n_kv_heads % tensor or self.d_ff % tensor)

    @property
    def _block_matmul_params(self) -> int:
        D, F = self.d_model, self.d_ff
        return 2 * D * D + 2 * D * self.kv_width + (3 if self.gated_mlp else 2) * D * F

    @property
    def block_params(self) -> int:
        D, F = self.d_model, self.d_ff
        if self.biases:  # qkv, out and both mlp biases, two LayerNorms (scale and bias)
            return self._block_matmul_params + 9 * D + F
        return self._block_matmul_params + 2 * D + (2 * D // self.n_heads if self.qk_norm else 0)

    @property
    def embed_params(self) -> int:
        return (self.vocab_size + (self.seq_len if self.learned_positions else 0)) * self.d_model

    @property
    def head_params(self) -> int:
        # A tied head still holds a copy of the table on the last site (sites never share parameters).
        return (2 if self.biases else 1) * self.d_model + self.vocab_size * self.d_model

    @property
    def params(self) -> int:
        return self.n_layers * self.block_params + self.embed_params + self.head_params

    def block_flops(self, seq: int) -> tuple[float, float]:
        """(matmul, attention) forward FLOPs of one block for one sequence of `seq` tokens."""
        return 2.0 * seq * self._block_matmul_params, 4.0 * seq * seq * self.d_model

    def head_flops(self, seq: int) -> float:
        return 2.0 * seq * self.d_model * self.vocab_size

    def train_flops_per_token(self, seq: int) -> float:
        """Forward + backward FLOPs per token of the whole model (no recompute): 3 x forward."""
        mm, att = self.block_flops(seq)
        return 3.0 * (self.n_layers * (mm + att) + self.head_flops(seq)) / seq


@dataclass(frozen=True)
class Hardware:
    """What one device of a site offers: peak FLOP/s in its compute dtype, memory, fp8 support."""

    peak_flops: float
    memory_bytes: float
    compute_dtype: str = "bfloat16"
    fp8: bool = False
    fp8_format: str | None = None  # fp8 on a link needs the same format on both ends
    known: bool = True  # False: the capability table did not know the device kind (a conservative default)
    kind: str = ""


@dataclass(frozen=True)
class SiteProfile:
    """Measured times of ONE block on one site (from `hxtrain profile`), per data replica.

    `fwd_s` / `bwd_s`: seconds for one block's forward / full backward on `tokens` tokens per data replica, at
    tensor size `tensor`. Times scale linearly with tokens per replica; the planner keeps the measured tensor size.
    """

    fwd_s: float
    bwd_s: float
    tokens: int
    tensor: int = 1

    def __post_init__(self):
        for f in ("fwd_s", "bwd_s"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise CostModelError(f"SiteProfile.{f}: expected a positive number of seconds, got {v!r}")
        for f in ("tokens", "tensor"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CostModelError(f"SiteProfile.{f}: expected a positive integer, got {v!r}")


@dataclass(frozen=True)
class StageCosts:
    """Per-microbatch costs on one site at one (data, tensor) shape. Times in seconds, memory in bytes per device.

    Block times are per block; `head_*` apply to the last stage only (embedding costs are negligible in time).
    `B` = input-grad, `W` = weight-grad; an unsplit backward is `block_bwd_in + block_bwd_w`.
    """

    data: int
    tensor: int
    block_fwd: float
    block_bwd_in: float
    block_bwd_w: float
    head_fwd: float
    head_bwd_in: float
    head_bwd_w: float
    block_param_bytes: float  # optimizer state + grads + weights of one block, per device
    block_act_bytes: float  # stored activations of one block for one live microbatch, per device
    block_work_bytes: float  # transient: one block's full activations (recompute) per device
    embed_param_bytes: float
    head_param_bytes: float
    head_work_bytes: float  # fp32 logits of one microbatch on the last stage, per device
    dp_sync_per_block: float  # seconds of the once-per-step gradient all-reduce, per block
    dp_sync_head: float
    dp_sync_embed: float
    # What a split backward (ZB-H1's W) adds per block / on the head: the forward it recomputes from the held
    # input, as the engine's B does (`core.programs`); 0 when activations are held (no recompute modelled).
    block_split_extra: float = 0.0
    head_split_extra: float = 0.0


def wire_bytes(codec: str, rows: int, width: int) -> float:
    """Bytes of a [rows, width] boundary tensor after `codec` (int8/fp8 add a 4-byte fp32 scale per row)."""
    if codec not in CODEC_BYTES:
        raise CostModelError(f"codec {codec!r}: expected one of {', '.join(CODEC_BYTES)}")
    per_elem, per_row = CODEC_BYTES[codec]
    return rows * (width * per_elem + per_row)


def link_time(nbytes: float, bandwidth_gbps: float, latency_ms: float) -> float:
    """Seconds to move `nbytes` over a link: latency + bytes / bandwidth (Gbit/s = 1e9 bits per second)."""
    if not bandwidth_gbps > 0:
        raise CostModelError(f"link bandwidth_gbps: expected > 0 Gbit/s, got {bandwidth_gbps!r}; a link with no "
                             "bandwidth cannot carry activations")
    return latency_ms * 1e-3 + nbytes * 8.0 / (bandwidth_gbps * 1e9)


def _ring_allreduce(nbytes: float, n: int, bandwidth_GBps: float) -> float:
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * nbytes / (bandwidth_GBps * 1e9)


def stage_costs(shape: ModelShape, hw: Hardware, *, microbatch: int, seq: int, data: int, tensor: int,
                recompute: bool = False, assumptions: Assumptions = Assumptions(),
                profile: SiteProfile | None = None) -> StageCosts:
    """Costs of one microbatch of `microbatch` sequences x `seq` tokens on a site of `data x tensor` devices."""
    if microbatch % data:
        raise CostModelError(f"microbatch of {microbatch} sequences does not split over data = {data} replicas")
    a = DTYPE_BYTES.get(hw.compute_dtype, 2)
    D, F, H, V = shape.d_model, shape.d_ff, shape.n_heads, shape.vocab_size
    b_rep = microbatch // data  # sequences per data replica
    tokens = b_rep * seq
    speed = tensor * hw.peak_flops * assumptions.efficiency  # FLOP/s of one data replica

    tp_one = _ring_allreduce(tokens * D * a, tensor, assumptions.tp_bandwidth_GBps)
    if profile is not None:
        scale = tokens / profile.tokens
        fwd, bwd = profile.fwd_s * scale, profile.bwd_s * scale  # measured: communication included
        bwd_in, bwd_w = bwd / 2, bwd / 2
    else:
        mm, att = shape.block_flops(seq)
        fwd = b_rep * (mm + att) / speed + 2 * tp_one
        bwd_in = b_rep * (mm + 2 * att) / speed + 2 * tp_one
        bwd_w = b_rep * mm / speed
    # A measured backward is the engine's, which recomputes the stage forward; a split one does so in B and W.
    redo = profile is not None or recompute
    if recompute:
        bwd_in += fwd
    hf = b_rep * shape.head_flops(seq) / speed

    opt = assumptions.optimizer_bytes_per_param
    mlp_acts = (3 if shape.gated_mlp else 2) * F
    sharded_act = (4 * D + (3 * D + 2 * shape.kv_width + mlp_acts + H * seq) / tensor) * a
    act = D * a if recompute else sharded_act
    grad = assumptions.grad_bytes / tensor
    dp = lambda params: _ring_allreduce(params * grad, data, assumptions.dp_bandwidth_GBps)  # noqa: E731
    return StageCosts(
        data=data, tensor=tensor, block_fwd=fwd, block_bwd_in=bwd_in, block_bwd_w=bwd_w,
        head_fwd=hf, head_bwd_in=hf, head_bwd_w=hf, block_split_extra=fwd if redo else 0.0,
        head_split_extra=hf if redo else 0.0,
        block_param_bytes=shape.block_params * opt / tensor,
        block_act_bytes=tokens * act,
        block_work_bytes=tokens * sharded_act if recompute else 0.0,
        embed_param_bytes=shape.embed_params * opt / tensor,
        head_param_bytes=shape.head_params * opt / tensor,
        head_work_bytes=tokens * V * 4.0 / tensor,
        dp_sync_per_block=dp(shape.block_params), dp_sync_head=dp(shape.head_params),
        dp_sync_embed=dp(shape.embed_params),
    )


def hardware_for(site, capability=None) -> Hardware:
    """What one device of `site` (a topology Site) offers; the site's own overrides win over the table.

    `capability(device_kind) -> Capability` defaults to `hxtrain.backends.capability_for` (imported here, not at
    module import, because the backends package starts JAX and the planner should not need it otherwise).
    """
    if capability is None:
        from hxtrain.backends import capability_for as capability
    from hxtrain.backends import dtype_policy  # the one place that decides a site's compute dtype

    kind = site.device_kind or site.backend
    cap = capability(kind)
    try:
        dtype = dtype_policy(cap, site.compute_dtype).compute_dtype
        peak = site.peak_tflops * 1e12 if site.peak_tflops else cap.peak_flops(dtype)
    except Exception as e:  # BackendError: the site asks for a dtype its devices lack
        raise CostModelError(f"site {site.name!r}: {e}") from None
    memory = (site.memory_gib or cap.hbm_gib) * 2**30
    return Hardware(peak_flops=peak, memory_bytes=memory, compute_dtype=dtype,
                    fp8=cap.fp8_format is not None, fp8_format=cap.fp8_format,
                    known=bool(cap.known) or bool(site.peak_tflops and site.memory_gib), kind=cap.name)
