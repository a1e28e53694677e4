"""CUDA paths: grouped GEMM on the GPU against the loop reference, and a short training run.

Marked `gpu` and skipped where torch sees no CUDA device (CI and laptops).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epmoe.model.experts import GroupedExperts
from epmoe.train.cli import load_config
from epmoe.train.trainer import train

from .conftest import TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_grouped_experts_on_cuda_bf16_match_the_loop_reference() -> None:
    torch.manual_seed(0)
    grouped = GroupedExperts(8, 128, 256, "swiglu", impl="grouped").cuda()
    loop = GroupedExperts(8, 128, 256, "swiglu", impl="loop").cuda()
    loop.load_state_dict(grouped.state_dict())
    counts_E = torch.tensor([0, 64, 128, 0, 32, 96, 16, 176], device="cuda")
    x_ND = torch.randn(int(counts_E.sum()), 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_grouped = grouped(x_ND, counts_E)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_loop = loop(x_ND, counts_E)
    torch.testing.assert_close(y_grouped.float(), y_loop.float(), atol=5e-2, rtol=5e-2)


def test_training_runs_on_cuda_with_bf16(tmp_path: Path) -> None:
    cfg = load_config([*TINY, "train.device=cuda", "train.precision=bf16", "train.steps=20"])
    result = train(cfg, tmp_path)
    assert result.losses[-1] < result.losses[0]
