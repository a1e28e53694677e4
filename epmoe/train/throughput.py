"""How well the hardware is used: the peak FLOP/s one device offers, model FLOPs utilisation
(MFU) and peak memory per rank.

    MFU = training FLOPs per token (epmoe/model/size.py) × tokens/s of one device / peak FLOP/s

The peak is `train.peak_tflops` when set; else a known GPU's dense bf16 tensor-core peak from its
data sheet; else, on CPU, what a matmul of the run's compute dtype reaches on this rank's threads
in a short probe at start (so on CPU, MFU says how much of *measured* matmul speed the step gets).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from epmoe.comm.process import all_reduce_max_

# dense bf16 tensor-core TFLOP/s from NVIDIA's data sheets (SXM parts), matched against
# torch.cuda.get_device_name; the first name found in it wins
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
PROBE_SECONDS = 0.3  # long enough for a steady rate, short against a run's start-up
PROBE_N = 512  # square matmul size of the probe


@dataclass(frozen=True)
class Peak:
    tflops: float  # one device's peak, TFLOP/s
    source: str  # where it came from, for the run's header


def matmul_probe_tflops(dtype: torch.dtype, seconds: float = PROBE_SECONDS, n: int = PROBE_N) -> float:
    """TFLOP/s of repeated n×n matmuls in `dtype` on the CPU with torch's current threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: the first call picks kernels
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed / 1e12


def device_peak(device: torch.device, peak_tflops: float, dtype: torch.dtype) -> Peak:
    """One device's peak; see the module docstring. A GPU not in GPU_PEAK_TFLOPS without
    train.peak_tflops gets none (tflops 0: MFU is not reported, and the source says why; a guess
    would make it a made-up number)."""
    if peak_tflops > 0:
        return Peak(peak_tflops, "train.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for known, tflops in GPU_PEAK_TFLOPS.items():
            if known in name:
                return Peak(tflops, f"{known} data sheet (dense bf16)")
        return Peak(0.0, f"{name} is not in epmoe's table: set train.peak_tflops for MFU")
    return Peak(matmul_probe_tflops(dtype), f"CPU matmul probe ({str(dtype).removeprefix('torch.')}, "
                                            f"{torch.get_num_threads()} threads)")  # fmt: skip


SLOW_BF16_RATIO = 4  # bf16 matmul this many times slower than fp32: the CPU has no native bf16


def slow_bf16_warning(peak: Peak, device: torch.device) -> str | None:
    """On a CPU without native bf16 matmul (AVX2-only parts: no AVX512-BF16 or AMX), bf16 autocast
    runs tens of times slower than fp32 (0.8 vs 43 GFLOP/s on one AVX2 EPYC core): the warning
    with both rates, or None where bf16 is fine (or the device is not a CPU)."""
    if device.type != "cpu" or not peak.tflops or "bfloat16" not in peak.source:
        return None
    fp32 = matmul_probe_tflops(torch.float32)
    if peak.tflops * SLOW_BF16_RATIO > fp32:
        return None
    return (f"warning: train.precision=bf16 on this CPU: bf16 matmul {peak.tflops * 1e3:.3g} GFLOP/s vs fp32 "
            f"{fp32 * 1e3:.3g} GFLOP/s (no native bf16); train.precision=fp32 runs faster")  # fmt: skip


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: allocated device memory on CUDA, the resident set (ru_maxrss) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Throughput:
    """The per-step numbers a user tunes by: step time, tokens/s (total and per device), tokens so
    far, elapsed wall time and MFU; at logging steps also the peak memory of the fullest rank."""

    def __init__(self, flops_per_token: float, peak: Peak, tokens_per_step: int, world: int, device: torch.device):
        self.flops_per_token, self.peak = flops_per_token, peak
        self.tokens_per_step, self.world, self.device = tokens_per_step, world, device
        self.started = time.perf_counter()

    def step_metrics(self, seconds: float, completed: int) -> dict[str, float]:
        """Of a step that took `seconds`, after which `completed` steps are done."""
        per_device = self.tokens_per_step / self.world / seconds
        out = {"step_ms": 1e3 * seconds, "tokens_per_s": self.tokens_per_step / seconds,
               "tokens_per_s_per_device": per_device, "tokens": completed * self.tokens_per_step,
               "elapsed_s": time.perf_counter() - self.started}  # fmt: skip
        if self.peak.tflops > 0:
            out["mfu"] = self.flops_per_token * per_device / (self.peak.tflops * 1e12)
        return out

    def memory_gib(self) -> float:
        """The largest peak memory over ranks, GiB. A collective (world > 1): every rank calls it
        at the same steps (the logging steps)."""
        peak = torch.tensor([float(peak_memory_bytes(self.device))], dtype=torch.float64, device=self.device)
        return all_reduce_max_(peak).item() / 2**30
