"""The one object that knows the parallel layout: degrees, validation, and process groups.

Ranks are laid out EP-major: rank = dp_index * ep + ep_index. So
- the EP group of a rank is the `ep` consecutive ranks that together hold every expert;
- its expert-data-parallel group is the `world / ep` ranks with the same ep_index (the
  ranks holding the same experts), where expert gradients are reduced.
Nobody else derives ranks or groups.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch.distributed as dist


class ParallelConfigError(ValueError):
    """Degrees that cannot work; the message quotes the values and the fix."""


@dataclass
class ParallelDims:
    world: int
    dp: int
    ep: int
    num_experts: int
    ep_group: dist.ProcessGroup | None = field(default=None, init=False, repr=False)
    expert_dp_group: dist.ProcessGroup | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world < 1 or self.ep < 1 or self.dp < 1:
            raise ParallelConfigError(f"world ({self.world}), dp ({self.dp}) and ep ({self.ep}) must be >= 1")
        if self.world % self.ep:
            raise ParallelConfigError(f"ep ({self.ep}) must divide world size ({self.world})")
        if self.dp != self.world:
            raise ParallelConfigError(
                f"dp ({self.dp}) must equal world size ({self.world}): every rank reads its own data"
            )
        if self.num_experts % self.ep:
            raise ParallelConfigError(f"num_experts ({self.num_experts}) must be divisible by ep ({self.ep})")

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def ep_ranks(self, rank: int) -> list[int]:
        """The ranks of `rank`'s EP group, in EP order."""
        first = rank - rank % self.ep
        return list(range(first, first + self.ep))

    def expert_dp_ranks(self, rank: int) -> list[int]:
        """The ranks that hold the same experts as `rank`."""
        return list(range(rank % self.ep, self.world, self.ep))

    def build_groups(self, rank: int, timeout: datetime.timedelta | None = None) -> None:
        """Create the EP and expert-DP groups (collective: every rank must call it). timeout:
        how long their collectives wait for a peer (new groups do not inherit the world's)."""
        # NOTE: new_group must be called by all ranks for every group, in the same order
        for first in range(0, self.world, self.ep):
            group = dist.new_group(list(range(first, first + self.ep)), timeout=timeout)
            if rank in range(first, first + self.ep):
                self.ep_group = group
        for ep_index in range(self.ep):
            group = dist.new_group(list(range(ep_index, self.world, self.ep)), timeout=timeout)
            if rank % self.ep == ep_index:
                self.expert_dp_group = group
