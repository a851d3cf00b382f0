"""The job's 3D topology: one object that every part of the system asks for ranks and groups.

    topo = Topology(layout)          # after the process group exists, on every rank
    topo.pp_rank, topo.dp_rank, topo.tp_rank
    topo.tp_group                    # None when tensor parallelism is off (a world of one)
    topo.dp_group
    deepspeed.initialize(..., mpu=topo.mpu())   # non-pipeline runs; PipelineModule uses the same grid

It wraps DeepSpeed's own `PipeModelDataParallelTopology` (axes pipe, data, model: global
rank = (pp_idx * dp + dp_idx) * tp + tp_idx, `Layout.rank`) and `PipelineParallelGrid`,
whose groups DeepSpeed uses for gradient reduction, ZeRO partitioning, gradient norms and
pipeline communication. Our tensor-parallel layers use the grid's "slice" group as their TP
group, so DeepSpeed and the model agree on every group by construction; the pipeline module
is built on this very grid (see `pretrain.parallel.pipeline`), so no second set of groups
exists.

Group meanings (DeepSpeed's names):
    tp_group  ranks with the same (pp, dp): tensor-parallel peers ("slice" group)
    dp_group  ranks with the same (pp, tp): gradient all-reduce / ZeRO partitioning
    (DeepSpeed's grid also has the pipeline group, ranks with the same (dp, tp), and the
    model-parallel group, ranks with the same dp, over which it sums gradient norms.)

`coords_table(layout)` is the pure (no process group) form of the rank -> (pp, dp, tp) map.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["Topology", "coords_table"]


def coords_table(layout) -> list[tuple[int, int, int, int]]:
    """(global rank, pp, dp, tp) for every rank of `layout`, in rank order; no process group needed."""
    return [(r, *layout.coords(r)) for r in range(layout.world_size)]


class Topology:
    """Ranks and process groups of a `Layout` (collective to construct: every rank, same order)."""

    def __init__(self, layout):
        import torch.distributed as dist
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

        if not dist.is_initialized():
            raise RuntimeError("Topology needs an initialised process group")
        world = dist.get_world_size()
        if world != layout.world_size:
            raise RuntimeError(f"the process group has {world} ranks, the layout was resolved for "
                               f"{layout.world_size}")
        self.layout = layout
        self.topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
        for r in range(world):  # our Layout and DeepSpeed's topology must agree on every rank
            c = self.topo.get_coord(r)
            if (c.pipe, c.data, c.model) != layout.coords(r):
                raise RuntimeError(f"rank {r}: DeepSpeed topology {c} disagrees with the layout "
                                   f"{layout.coords(r)}")
        self.grid = PipelineParallelGrid(topology=self.topo)
        self.rank = dist.get_rank()
        self.world_size = world
        self.pp_rank, self.dp_rank, self.tp_rank = layout.coords(self.rank)
        self.pp, self.dp, self.tp = layout.pp, layout.dp, layout.tp
        assert self.grid.get_stage_id() == self.pp_rank
        assert self.grid.get_data_parallel_rank() == self.dp_rank
        assert self.grid.get_slice_parallel_rank() == self.tp_rank

    # ------------------------------------------------------------------ groups
    @property
    def tp_group(self) -> Optional[object]:
        """The tensor-parallel group, or None when tp == 1 (our TP layers then call no collective)."""
        return None if self.tp == 1 else self.grid.get_slice_parallel_group()

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def mpu(self):
        """The model-parallel unit handed to `deepspeed.initialize(mpu=...)` (DeepSpeed's grid)."""
        return self.grid

    def describe(self) -> str:
        return f"rank {self.rank} = (pp {self.pp_rank}, dp {self.dp_rank}, tp {self.tp_rank})"
