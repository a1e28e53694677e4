"""Routed experts with stacked weights, computed over contiguous per-expert row segments.

Shape key: N rows (token, choice pairs) sorted by expert, D model width, F expert hidden
size, E experts. `counts_E[e]` rows of expert e follow those of expert e-1.

Paths that compute the same function:
- `grouped`: one `torch._grouped_mm` per projection over all segments;
- `loop`: a Python loop over experts, one matmul per segment, left to autograd: the
  readable reference every other path is tested against (outputs and gradients);
- `fused` (single device only): `forward_fused` skips the sorted rows altogether, see
  fused_experts.py; the LocalDispatcher takes it when `fuses_dispatch` says so.
`auto` (the default) takes `grouped` on CUDA. On CPU it runs the loop for small sorted rows;
for large ones (see `auto_impl`) `grouped` where the process retains freed host memory (the
training program makes it, host_memory.py), else `fused`, which allocates no large buffer.
benchmarks/layer.py, torch 2.13, 2-core AVX-512 CPU, MoE/dense with memory retained:
fine-grained fp32 grouped 1.10, fused 1.19, loop 1.18; bf16 autocast grouped 1.46, fused 1.81;
coarse even. With glibc's default every big buffer is page-faulted afresh each step and
grouped fell to 1.48 (fused 0.89, against a dense floor that pays the faults too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from epmoe.host_memory import host_memory_retained
from epmoe.model.fused_experts import GatherFFNScatter
from epmoe.model.permute import Permutation

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


# glibc's default mmap threshold: buffers this large are fresh, page-faulted memory on every
# step unless the process retains freed host memory
FUSE_MIN_BYTES = 32 << 20


def auto_impl(device: torch.device, sorted_rows_bytes: int, memory_retained: bool | None = None) -> str:
    """The path `expert_impl=auto` takes for (T*K, D) sorted rows of this size on `device`.

    CUDA: grouped GEMM. CPU: below FUSE_MIN_BYTES the loop (a few percent faster than fused on
    the small `make train` model); from there grouped where freed host memory is retained, else
    fused (see the module docstring). memory_retained: None = ask host_memory.
    """
    if device.type == "cuda" and HAS_GROUPED_MM:
        return "grouped"
    if sorted_rows_bytes < FUSE_MIN_BYTES:
        return "loop"
    if memory_retained is None:
        memory_retained = host_memory_retained()
    return "grouped" if HAS_GROUPED_MM and memory_retained else "fused"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    NOTE: torch 2.13's CPU backward of `_grouped_mm` rejects zero-stride gradients, such as
    the expanded ones `.sum().backward()` produces; this keeps such callers working.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if grad.numel() == 0:  # an empty tensor counts as contiguous even with zero strides
            return torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        return grad.contiguous()


def _grouped_matmul(x_ND: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_EIO, offs=offs_E))


def activation_fn(name: str, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """SwiGLU: silu(gate) * up. GELU: gelu(gate) (no up projection)."""
    return F.silu(gate) * up if name == "swiglu" else F.gelu(gate)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul here (grouped_mm has no autocast rule)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GroupedExperts(nn.Module):
    """E independent FFNs D -> F -> D with weights stacked on a leading expert dimension.

    `stacked_weights()` is the one answer to "which tensors are expert weights": expert
    parallelism shards them (`keep_experts`), gradient rules, migration and checkpoints read them.
    """

    # the stacked [E, ...] weights, in checkpoint order (w_up_EDF exists with SwiGLU only)
    WEIGHT_NAMES = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        activation: str = "swiglu",
        impl: str = "auto",
        out_init_scale: float = 1.0,
    ):
        super().__init__()
        if impl == "grouped" and not HAS_GROUPED_MM:
            raise ValueError(
                f"expert_impl=grouped needs torch._grouped_mm (torch {torch.__version__} lacks it); use auto or loop"
            )
        self.num_experts, self.activation = num_experts, activation
        self.impl = impl
        E, D, F_ = num_experts, d_model, hidden
        self.w_gate_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.w_up_EDF = nn.Parameter(torch.empty(E, D, F_)) if activation == "swiglu" else None
        self.w_down_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.reset_parameters(out_init_scale)

    def reset_parameters(self, out_init_scale: float = 1.0) -> None:
        D, F_ = self.w_gate_EDF.shape[1:]
        nn.init.normal_(self.w_gate_EDF, std=1 / math.sqrt(D))
        if self.w_up_EDF is not None:
            nn.init.normal_(self.w_up_EDF, std=1 / math.sqrt(D))
        nn.init.normal_(self.w_down_EFD, std=out_init_scale / math.sqrt(F_))

    def stacked_weights(self) -> dict[str, nn.Parameter]:
        """{attribute name: [E, ...] parameter} of the weights this module has, in WEIGHT_NAMES order."""
        return {name: p for name in self.WEIGHT_NAMES if (p := getattr(self, name)) is not None}

    def keep_experts(self, ids_L: torch.Tensor) -> None:
        """Keep only the experts `ids_L` (global ids, in that order; repeats are copies): expert
        e's rows become local rows. Replaces the parameters (an optimizer must be built after)."""
        for name, full in self.stacked_weights().items():
            setattr(self, name, nn.Parameter(full.detach()[ids_L].clone()))
        self.num_experts = len(ids_L)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        impl = self.impl
        if impl == "auto":
            impl = auto_impl(x_ND.device, x_ND.numel() * x_ND.element_size())
        if impl == "grouped":
            return self.forward_grouped(x_ND, counts_E)
        return self.forward_loop(x_ND, counts_E)  # also for `fused` when rows come sorted

    def fuses_dispatch(self, x_TD: torch.Tensor, top_k: int) -> bool:
        """Whether a single-device dispatcher should call `forward_fused` instead of `forward`."""
        if self.impl != "auto":
            return self.impl == "fused"
        row_bytes = x_TD.shape[1] * compute_dtype(x_TD).itemsize
        return auto_impl(x_TD.device, x_TD.shape[0] * top_k * row_bytes) == "fused"

    def forward_fused(self, x_TD: torch.Tensor, perm: Permutation, topk_w_TK: torch.Tensor) -> torch.Tensor:
        """y_TD = sum over kept pairs of weight * expert output, without sorted (T*K, D) rows."""
        dtype = compute_dtype(x_TD)
        w_up = self.w_up_EDF.to(dtype) if self.w_up_EDF is not None else None
        # NOTE: host sync for the segment sizes; autocast off inside (inputs are cast here)
        with torch.autocast(x_TD.device.type, enabled=False):
            return GatherFFNScatter.apply(
                x_TD.to(dtype), topk_w_TK, self.w_gate_EDF.to(dtype), w_up, self.w_down_EFD.to(dtype),
                perm.token_N, perm.choice_N, perm.counts_E.tolist(),
            )  # fmt: skip

    def forward_grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x_ND)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)  # segment ends
        x = x_ND.to(dtype)
        gate_NF = _grouped_matmul(x, self.w_gate_EDF.to(dtype), offs_E)
        up_NF = _grouped_matmul(x, self.w_up_EDF.to(dtype), offs_E) if self.w_up_EDF is not None else None
        return _grouped_matmul(activation_fn(self.activation, gate_NF, up_NF), self.w_down_EFD.to(dtype), offs_E)

    def forward_loop(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Reference path: one matmul chain per expert segment."""
        # unbind once: indexing w[e] in the loop would make autograd build a full E x D x F
        # zero gradient per expert and add them up
        w_gate = self.w_gate_EDF.unbind(0)
        w_up = self.w_up_EDF.unbind(0) if self.w_up_EDF is not None else None
        w_down = self.w_down_EFD.unbind(0)
        out = []
        # NOTE: host sync, the segment sizes are needed to split
        for e, x_nD in enumerate(x_ND.split(counts_E.tolist())):
            up_nF = x_nD @ w_up[e] if w_up is not None else None
            out.append(activation_fn(self.activation, x_nD @ w_gate[e], up_nF) @ w_down[e])
        return torch.cat(out)


class MLP(nn.Module):
    """A dense FFN D -> H -> D (SwiGLU or GELU): dense layers and shared experts.

    output_gate: the output is scaled per token by sigmoid(x . g), a learnt D -> 1 gate
    (Qwen2-MoE's shared expert).
    """

    def __init__(
        self, d_model: int, hidden: int, activation: str = "swiglu", out_init_scale: float = 1.0,
        output_gate: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.activation = activation
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False) if activation == "swiglu" else None
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.output_gate = nn.Linear(d_model, 1, bias=False) if output_gate else None
        nn.init.normal_(self.w_gate.weight, std=1 / math.sqrt(d_model))
        if self.w_up is not None:
            nn.init.normal_(self.w_up.weight, std=1 / math.sqrt(d_model))
        nn.init.normal_(self.w_down.weight, std=out_init_scale / math.sqrt(hidden))
        if self.output_gate is not None:
            nn.init.normal_(self.output_gate.weight, std=1 / math.sqrt(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.w_up(x) if self.w_up is not None else None
        y = self.w_down(activation_fn(self.activation, self.w_gate(x), up))
        return y if self.output_gate is None else torch.sigmoid(self.output_gate(x)) * y
