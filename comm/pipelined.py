"""The pipelined all-to-all dispatcher: expert compute overlaps the token exchange (Tutel-style).

Shape key: T tokens, K choices, D width, E experts, R = ep ranks, L = E / R local experts,
N rows this rank sends (its kept pairs, its own experts' included), M rows it receives in one
chunk, C chunks.

Same math as AllToAllDispatcher: dropless, capacity-dropped pairs never leave their rank, the
same permute / unpermute around the experts. Only the order of the work changes:
1. sort the kept (token, choice) pairs by destination slot (rank, local expert);
2. exchange the per-(rank, local expert) counts (NOTE: the one host sync per layer call); every
   chunk's splits and per-expert counts follow from them on the host, alike on every rank;
3. issue chunk 0's all-to-all, then compute the rows bound for this rank's own experts while it
   travels (they need no exchange);
4. for chunk i: wait for its rows, issue chunk i+1's all-to-all, regroup the rows by local expert
   and compute them, issue chunk i's return all-to-all (it travels while chunk i+1 computes);
5. wait for the returns and put every row back in its place; unpermute weights and sums per token.
The rows bound for a peer rank are cut into C contiguous pieces (`split_counts`); chunk c holds
piece c of every peer's rows. Where those are one contiguous run of x_ND (always at EP=2: one
peer), the chunk is sent as a view and its returns are received straight into y_ND; received
rows are regrouped by local expert only where they come from several peers: no copies otherwise.
Backward is one autograd.Function running the same pipeline on the gradients: chunk i+1's output
gradients travel while chunk i's expert graph is differentiated, and chunk i's input gradients
travel back while chunk i+1's is.

payload_dtype (e.g. bf16): exchanged rows (inputs, outputs and both gradients) are cast to it
just for the wire and back to the compute dtype on arrival; this rank's own rows are never cast.

NOTE: every rank issues the same collectives in the same order (one counts exchange, then 2C
all-to-alls per direction, empty ones included) whatever its data: NCCL, gloo and MPI all match
concurrent collectives by issue order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from epmoe.comm.communicator import Communicator, Handle
from epmoe.comm.dispatch import AllToAllDispatcher, sort_by_slot
from epmoe.comm.slot_map import SlotMap
from epmoe.model.dispatch import Side
from epmoe.model.experts import GroupedExperts
from epmoe.model.permute import unpermute
from epmoe.model.router import Routing


def split_counts(counts_L: list[int], chunks: int) -> list[list[int]]:
    """Cut rows grouped into L contiguous segments of counts_L rows into `chunks` contiguous
    pieces of near-equal size; returns each piece's rows per segment (C lists of L).

    Sender and receiver call it on the same counts, so both know every chunk's layout.
    """
    total = sum(counts_L)
    bounds = [c * total // chunks for c in range(chunks + 1)]
    ends = list(itertools.accumulate(counts_L))
    starts = [end - n for end, n in zip(ends, counts_L)]
    return [[max(0, min(e, hi) - max(s, lo)) for s, e in zip(starts, ends)] for lo, hi in zip(bounds, bounds[1:])]


def _transpose_segments(rows: torch.Tensor, counts_AB: list[list[int]]) -> torch.Tensor:
    """Rows grouped (a, b)-major into counts_AB[a][b]-row segments, regrouped (b, a)-major.

    Returns `rows` itself (no copy) when the non-empty segments already lie in that order, as
    they always do when a single a has rows (at EP=2 every received chunk comes from one peer).
    """
    B = len(counts_AB[0])
    order = [a * B + b for b in range(B) for a in range(len(counts_AB)) if counts_AB[a][b]]
    if order == sorted(order):
        return rows
    pieces = rows.split([n for counts_B in counts_AB for n in counts_B])
    return torch.cat([pieces[i] for i in order])


def _transposed(counts_AB: list[list[int]]) -> list[list[int]]:
    return [list(col) for col in zip(*counts_AB)]


def _kept_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    """Hooks under which an expert or side graph of the pipeline saves its tensors itself.

    NOTE: backward differentiates those graphs with nested torch.autograd.grad calls, each its own
    graph task; under activation checkpointing (epmoe/parallel/activation_checkpointing.py) a
    tensor saved through the checkpoint's hooks would make every such call recompute the whole
    block again (torch recomputes once per graph task), exchanges included. Innermost hooks win:
    these graphs keep their activations, the rest of the block is recomputed once.
    """
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


@dataclass
class _Plan:
    """Who sends which rows in which chunk, from the exchanged counts (host ints, same on every rank).

    Rows of x_ND bound for rank r start at start_R[r]; this rank's own rows (rank `me`) are never
    exchanged. send_CRL[c][r][l] rows go to rank r's local expert l in chunk c, recv_CRL[c][r][l]
    come from rank r for local expert l (both 0 for r = me).
    """

    me: int
    local_L: list[int]
    start_R: list[int]
    send_CRL: list[list[list[int]]]
    recv_CRL: list[list[list[int]]]

    @classmethod
    def build(cls, send_RL: list[list[int]], recv_RL: list[list[int]], me: int, chunks: int) -> _Plan:
        zeros_CL = [[0] * len(send_RL[0])] * chunks

        def per_chunk(counts_RL: list[list[int]]) -> list[list[list[int]]]:
            split_RCL = [zeros_CL if r == me else split_counts(n_L, chunks) for r, n_L in enumerate(counts_RL)]
            return [[split_CL[c] for split_CL in split_RCL] for c in range(chunks)]

        start_R = [0, *itertools.accumulate(sum(counts_L) for counts_L in send_RL)][:-1]
        return cls(me, send_RL[me], start_R, per_chunk(send_RL), per_chunk(recv_RL))

    def send_splits(self, c: int) -> list[int]:
        return [sum(counts_L) for counts_L in self.send_CRL[c]]

    def recv_splits(self, c: int) -> list[int]:
        return [sum(counts_L) for counts_L in self.recv_CRL[c]]

    def local_rows(self) -> slice:
        return slice(self.start_R[self.me], self.start_R[self.me] + sum(self.local_L))

    def send_runs(self, c: int) -> list[slice]:
        """Chunk c's rows of x_ND (and of y_ND, g_ND, dx_ND) in the order they travel (rank order),
        as maximal runs of contiguous rows: one run when they go to a single peer (always at EP=2)."""
        runs: list[slice] = []
        for r, start in enumerate(self.start_R):
            first = start + sum(sum(self.send_CRL[b][r]) for b in range(c))
            n = sum(self.send_CRL[c][r])
            if n and runs and runs[-1].stop == first:
                runs[-1] = slice(runs[-1].start, first + n)
            elif n:
                runs.append(slice(first, first + n))
        return runs


class _Arrival:
    """A handle whose rows are cast from the wire's dtype back to `dtype` when they arrive."""

    def __init__(self, handle: Handle, dtype: torch.dtype):
        self.handle, self.dtype = handle, dtype

    def wait(self) -> torch.Tensor:
        return self.handle.wait().to(self.dtype)


class _Landing:
    """A return exchange's handle: wait() puts the arrived rows (wire dtype) into `runs` of out_ND,
    cast on the way, unless they were received straight into out_ND (in_place)."""

    def __init__(self, handle: Handle, out_ND: torch.Tensor, runs: list[slice], in_place: bool):
        self.handle, self.out_ND, self.runs, self.in_place = handle, out_ND, runs, in_place

    def wait(self) -> torch.Tensor:
        rows = self.handle.wait()
        if not self.in_place:
            for run, piece in zip(self.runs, rows.split([run.stop - run.start for run in self.runs])):
                self.out_ND[run] = piece
        return self.out_ND


class _Pipeline:
    """One layer call's exchange: the plan, the expert graphs kept for backward, the stages."""

    def __init__(
        self,
        plan: _Plan,
        comm: Communicator,
        experts: GroupedExperts,
        params: list[torch.Tensor],
        x_ND: torch.Tensor,
        payload_dtype: torch.dtype | None,
        side: nn.Module | None = None,
    ):
        self.plan, self.comm, self.experts, self.params = plan, comm, experts, params
        self.payload_dtype = payload_dtype
        # a module computed while chunk 0 travels (the shared experts), with its own graph
        self.side = side
        self.side_params = [p for p in side.parameters() if p.requires_grad] if side is not None else []
        self.side_graph: tuple[torch.Tensor, torch.Tensor] | None = None
        C = len(plan.send_CRL)
        # expert counts of the local rows (index C) and of each chunk's received rows (0..C-1)
        counts_L_list = [[sum(col) for col in zip(*recv_RL)] for recv_RL in plan.recv_CRL] + [plan.local_L]
        counts_CL = torch.tensor(counts_L_list, dtype=torch.long)
        if x_ND.is_cuda:  # one small upload per call, without a host sync
            counts_CL = counts_CL.pin_memory().to(x_ND.device, non_blocking=True)
        self.counts_CL, self.chunks, self.x_dtype = counts_CL, C, x_ND.dtype
        # (leaf input rows, output rows) of each expert call that had rows, by its counts_CL index
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _wire(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.payload_dtype is None else rows.to(self.payload_dtype)

    def _send_out(self, rows_ND: torch.Tensor, c: int) -> Handle:
        """Chunk c's rows of rows_ND travel to their experts; the handle gives the arrived rows."""
        runs = self.plan.send_runs(c)
        # NOTE: a single run is sent as a view of rows_ND: nothing may write rows_ND meanwhile
        rows = rows_ND[runs[0]] if len(runs) == 1 else torch.cat([rows_ND[:0], *(rows_ND[run] for run in runs)])
        handle = self.comm.all_to_all_v(self._wire(rows), self.plan.recv_splits(c), self.plan.send_splits(c))
        return handle if self.payload_dtype is None else _Arrival(handle, self.x_dtype)

    def _send_back(self, rows_MD: torch.Tensor, c: int, out_ND: torch.Tensor) -> Handle:
        """Chunk c's computed rows travel back to their senders, landing in their rows of out_ND."""
        runs = self.plan.send_runs(c)
        in_place = len(runs) == 1 and (self.payload_dtype in (None, out_ND.dtype))
        send, recv = self.plan.send_splits(c), self.plan.recv_splits(c)
        handle = self.comm.all_to_all_v(self._wire(rows_MD), send, recv, out_ND[runs[0]] if in_place else None)
        return _Landing(handle, out_ND, runs, in_place)

    def _compute(self, x_MD: torch.Tensor, recv_RL: list[list[int]], index: int, needs_grad: bool) -> torch.Tensor:
        """Expert outputs of rows grouped by (source rank, local expert); keeps the graph for backward."""
        if x_MD.shape[0] == 0:  # nothing to compute: no graph, no gradient
            return x_MD.new_empty(0, x_MD.shape[1])
        with torch.set_grad_enabled(needs_grad), _kept_saved_tensors():
            leaf_MD = x_MD.detach().requires_grad_(needs_grad)
            y_sorted_MD = self.experts(_transpose_segments(leaf_MD, recv_RL), self.counts_CL[index])
            y_MD = _transpose_segments(y_sorted_MD, _transposed(recv_RL))
        if needs_grad:
            self.graphs[index] = (leaf_MD, y_MD)
        return y_MD.detach()

    def _side_forward(self, side_in_TD: torch.Tensor, needs_grad: bool) -> torch.Tensor:
        if self.side is None:
            return side_in_TD.new_empty(0)
        with torch.set_grad_enabled(needs_grad), _kept_saved_tensors():
            leaf_TD = side_in_TD.detach().requires_grad_(needs_grad)
            out_TD = self.side(leaf_TD)
        if needs_grad:
            self.side_graph = (leaf_TD, out_TD)
        return out_TD.detach()

    def _side_backward(self, g_TD: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(input gradient, parameter gradients) of the side module's graph."""
        if self.side_graph is None:
            return None, [torch.zeros_like(p) for p in self.side_params]
        (leaf_TD, out_TD), self.side_graph = self.side_graph, None
        d_in, *d_params = torch.autograd.grad(out_TD, [leaf_TD, *self.side_params], g_TD, allow_unused=True)
        return d_in, [torch.zeros_like(p) if d is None else d for p, d in zip(self.side_params, d_params)]

    def forward(
        self, x_ND: torch.Tensor, side_in_TD: torch.Tensor, needs_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan, C = self.plan, self.chunks
        y_ND = x_ND.new_empty(x_ND.shape)
        sending = self._send_out(x_ND, 0)
        side_out_TD = self._side_forward(side_in_TD, needs_grad)  # while chunk 0 travels
        y_local = self._compute(x_ND[plan.local_rows()], [plan.local_L], C, needs_grad)
        returning = []
        for c in range(C):
            x_MD = sending.wait()
            if c + 1 < C:
                sending = self._send_out(x_ND, c + 1)
            returning.append(self._send_back(self._compute(x_MD, plan.recv_CRL[c], c, needs_grad), c, y_ND))
        y_ND[plan.local_rows()] = y_local
        for handle in returning:
            handle.wait()
        return y_ND, side_out_TD

    def _differentiate(self, g_MD: torch.Tensor, index: int, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """Input gradient of expert call `index` (C: the local rows); adds its parameter gradients to `grads`."""
        graph = self.graphs.pop(index, None)
        if graph is None:
            return g_MD.new_empty(0, g_MD.shape[1])
        leaf_MD, y_MD = graph
        dx_MD, *dparams = torch.autograd.grad(y_MD, [leaf_MD, *self.params], g_MD, allow_unused=True)
        for i, dp in enumerate(dparams):
            if dp is not None:
                grads[i] = dp if grads[i] is None else grads[i] + dp
        return dx_MD if dx_MD is not None else torch.zeros_like(leaf_MD)

    def backward(self, g_ND: torch.Tensor, g_side_TD: torch.Tensor):
        """(dx_ND, d side input, expert parameter grads, side parameter grads)."""
        plan, C = self.plan, self.chunks
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        dx_ND = g_ND.new_empty(g_ND.shape, dtype=self.x_dtype)
        sending = self._send_out(g_ND, 0)
        d_side_in, side_grads = self._side_backward(g_side_TD)  # while chunk 0's gradients travel
        dx_local = self._differentiate(g_ND[plan.local_rows()], C, grads)
        returning = []
        for c in range(C):
            g_MD = sending.wait()
            if c + 1 < C:
                sending = self._send_out(g_ND, c + 1)
            returning.append(self._send_back(self._differentiate(g_MD, c, grads), c, dx_ND))
        dx_ND[plan.local_rows()] = dx_local
        for handle in returning:
            handle.wait()
        # a rank that computed no rows still owes each expert parameter a (zero) gradient
        expert_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        return dx_ND, d_side_in, expert_grads, side_grads


class _PipelinedExperts(torch.autograd.Function):
    """(y_ND, side_TD): the experts' outputs for x_ND's rows, wherever the experts live, and the
    side module's output for side_in_TD (empty without one), computed while chunk 0 travels.

    The expert and side parameters are inputs so that their gradients are returned from
    backward (torch.autograd.grad(loss, params) works), never accumulated into .grad on the side.
    """

    @staticmethod
    def forward(ctx, pipe: _Pipeline, needs_grad: bool, x_ND, side_in_TD, *params: torch.Tensor):  # noqa: D102
        ctx.pipe = pipe
        return pipe.forward(x_ND, side_in_TD, needs_grad)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ND: torch.Tensor, g_side_TD: torch.Tensor):  # noqa: D102
        pipe, ctx.pipe = ctx.pipe, None  # drop the chunk graphs once used
        dx_ND, d_side_in, expert_grads, side_grads = pipe.backward(g_ND.contiguous(), g_side_TD)
        return None, None, dx_ND, d_side_in, *expert_grads, *side_grads


class PipelinedDispatcher(AllToAllDispatcher):
    """The same contract and slot map as AllToAllDispatcher; the exchange runs in `chunks` pieces."""

    def __init__(
        self,
        slots: SlotMap | torch.Tensor,
        comm: Communicator,
        chunks: int,
        payload_dtype: torch.dtype | None = None,
    ):
        """slots: where each (token, choice) goes (a SlotMap, or slot_of_expert_E[e] = rank * L +
        local index of expert e for a placement without replicas); comm spans
        the EP group (its size is ep); chunks: pieces the exchanged rows are cut into (>= 1);
        payload_dtype: the rows' dtype on the wire (None: the compute dtype, no cast)."""
        if chunks < 1:
            raise ValueError(f"chunks ({chunks}) must be >= 1; chunks=1 exchanges all rows at once")
        super().__init__(slots, comm, payload_dtype)
        self.chunks = chunks

    def __call__(
        self, x_TD: torch.Tensor, routing: Routing, experts: GroupedExperts, side: Side | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_TD: (T, D) tokens; experts compute this rank's L local slots; `side` (the shared
        experts) is computed while the first chunk is in flight, forward and backward.
        Returns (y_TD, side's output or None)."""
        perm, x_ND, send_counts_RL, recv_counts_RL = sort_by_slot(x_TD, routing, self.slot_map, self.comm)
        # NOTE: the one host sync per call: every chunk's splits and expert counts derive from these
        send_RL, recv_RL = torch.stack((send_counts_RL, recv_counts_RL)).tolist()
        plan = _Plan.build(send_RL, recv_RL, self.comm.rank, self.chunks)

        params = [p for p in experts.parameters() if p.requires_grad]
        side_module = side.module if side is not None else None
        pipe = _Pipeline(plan, self.comm, experts, params, x_ND, self.payload_dtype, side_module)
        side_in_TD = side.x_TD if side is not None else x_ND.new_empty(0)
        needs_grad = torch.is_grad_enabled() and (
            x_ND.requires_grad or side_in_TD.requires_grad or bool(params) or bool(pipe.side_params)
        )
        y_ND, side_out = _PipelinedExperts.apply(pipe, needs_grad, x_ND, side_in_TD, *params, *pipe.side_params)
        return unpermute(y_ND, perm, routing.topk_w_TK), (side_out if side is not None else None)
