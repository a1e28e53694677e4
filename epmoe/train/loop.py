"""The training program: build, (resume,) train with periodic validation, sample, plot.

`train(cfg, run_dir)` takes a validated `Config` and a run directory and returns a
`TrainResult`; Hydra and the command line stay in `__main__.py`.

One step:
1. for each of `grad_accum` micro-batches: forward under autocast, loss = cross-entropy +
   the routers' aux and z losses, backward (scaled by 1/grad_accum);
2. clip to one global gradient norm, AdamW step, schedule step;
3. aux-loss-free balancing: each router's bias moves toward uniform by that step's load;
4. metrics: losses, lr, gradient norm, tokens/s, per-layer expert load, imbalance, drops.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from epmoe.comm.communicator import ep_communicator
from epmoe.comm.parallel_dims import ParallelDims
from epmoe.comm.process import RankInfo, all_reduce_sum_, init_from_env
from epmoe.config import Config, ConfigError, LoggerConfig, TrainConfig
from epmoe.host_memory import retain_freed_host_memory
from epmoe.model.router import Routing
from epmoe.model.transformer import Transformer
from epmoe.parallel.chunk_tuner import ChunkTuner
from epmoe.parallel.data_parallel import apply_data_parallel
from epmoe.parallel.expert_parallel import apply_expert_parallel
from epmoe.parallel.timing import LayerTimer, attach_timers, run_summary, step_timing
from epmoe.placement.migration import Rebalancer
from epmoe.placement.placement import Placement
from epmoe.train import checkpoint, checkpoint_files
from epmoe.train.data import TokenSplits, load_splits, sample_batch
from epmoe.train.engine import Engine, NativeEngine, autocast
from epmoe.train.loggers import Loggers
from epmoe.train.plots import plot_run
from epmoe.train.routing_stats import RoutingCounts, RoutingTrace, topk_of_layers

LN2 = math.log(2)
VAL_STREAM = 1 << 20  # data stream ids >= this are validation batches


class NonFiniteStep(FloatingPointError):
    """A step whose loss or gradient norm is not finite (train.on_nonfinite=abort)."""


class TrainingAborted(RuntimeError):
    """The run stopped itself (a non-finite step); the message says where and what was kept."""


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float] = field(default_factory=list)  # training loss (cross-entropy) per step run
    val_loss: float | None = None  # final held-out cross-entropy, nats per token
    checkpoint: Path | None = None

    @property
    def val_bpb(self) -> float | None:
        """Held-out bits per token (per byte for byte-level data)."""
        return None if self.val_loss is None else self.val_loss / LN2


@dataclass
class Parallel:
    """This rank's place in the run; world 1 (no process group) is the single-process case."""

    info: RankInfo
    dims: ParallelDims
    rebalancer: Rebalancer | None = None  # online re-placement of experts (placement.rebalance_every)
    timers: list[LayerTimer] = field(default_factory=list)  # per MoE layer, under expert parallelism
    placement: Placement | None = None  # as apply_expert_parallel installed it (None: every expert local)

    @property
    def expert_placement(self) -> Placement | None:
        """The placement in force now: re-placement moves experts away from the installed one."""
        return self.rebalancer.placement if self.rebalancer is not None else self.placement

    @classmethod
    def single(cls, num_experts: int) -> Parallel:
        return cls(RankInfo(0, 1), ParallelDims(world=1, dp=1, ep=1, num_experts=num_experts))

    def my_slice(self, x_BS: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch of world x batch_size sequences."""
        per_rank = x_BS.shape[0] // self.info.world
        return x_BS[self.info.rank * per_rank : (self.info.rank + 1) * per_rank]

    def mean(self, value: float) -> float:
        """Mean of a per-rank scalar over all ranks (equal batch sizes)."""
        return all_reduce_sum_(torch.tensor([value], dtype=torch.float64))[0].item() / self.info.world


def setup_parallel(cfg: Config, model: Transformer, device: torch.device) -> Parallel:
    """Join the launcher's process group (if any) and apply expert parallelism from outside."""
    info = init_from_env(device, cfg.train.collective_timeout_s)
    if info.world == 1 and cfg.parallel.ep == 1:
        return Parallel.single(cfg.model.num_experts)
    dp = cfg.parallel.dp or info.world
    dims = ParallelDims(world=info.world, dp=dp, ep=cfg.parallel.ep, num_experts=cfg.model.num_experts)
    dims.build_groups(info.rank, datetime.timedelta(seconds=cfg.train.collective_timeout_s))
    apply_data_parallel(model, dims)
    if dims.ep_enabled:
        if cfg.comm.backend == "mpi" and device.type != "cpu":
            raise ConfigError(f"comm.backend=mpi exchanges CPU tensors, but this run is on {device}; use comm=torch")
        comm = ep_communicator(cfg.comm.backend, dims, info.rank)
        chunks = None  # the plain all-to-all dispatcher
        if cfg.comm.dispatcher == "pipelined":  # auto: ChunkTuner sets the count from the first step
            chunks = 1 if cfg.comm.chunks == "auto" else int(cfg.comm.chunks)
        payload = torch.bfloat16 if cfg.comm.dtype == "bf16" else None
        placement = apply_expert_parallel(model, dims, info.rank, cfg.placement.policy, comm, chunks, payload,
                                          cfg.placement.slots_per_rank)  # fmt: skip
        rebalancer = None
        if cfg.placement.rebalance_every > 0:
            rebalancer = Rebalancer(cfg.placement.policy, cfg.placement.rebalance_every, placement,
                                    dims.ep_rank(info.rank), info.is_main, comm)  # fmt: skip
        return Parallel(info, dims, rebalancer, attach_timers(model), placement=placement)
    return Parallel(info, dims)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device; use train.device=cpu")
    return torch.device(name)


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


@torch.no_grad()
def evaluate(model: Transformer, data: TokenSplits, cfg: Config, device: torch.device, par: Parallel) -> float:
    """Mean held-out cross-entropy (nats/token) over the same `eval_batches` batches every time."""
    model.eval()
    total = 0.0
    global_batch = cfg.train.batch_size * par.info.world
    for i in range(cfg.train.eval_batches):
        x_BS, y_BS = sample_batch(data.val, global_batch, cfg.data.seq_len, cfg.train.seed, VAL_STREAM + i, 0)
        with autocast(device, cfg.train.precision):
            logits_BSV = model(par.my_slice(x_BS).to(device)).logits_BSV
            total += lm_loss(logits_BSV, par.my_slice(y_BS).to(device)).item()
    model.train()
    return par.mean(total / cfg.train.eval_batches)


def routing_metrics(load_LE: torch.Tensor, dropped: int, aux: float, z: float) -> dict[str, Any]:
    """Summaries of one step's routing: load_LE = tokens per (MoE layer, expert)."""
    if load_LE.numel() == 0:
        return {}
    load_LE = load_LE.double()
    imbalance_L = load_LE.max(dim=1).values / load_LE.mean(dim=1).clamp_min(1e-9)
    return {
        "aux_loss": aux,
        "z_loss": z,
        "imbalance": imbalance_L.max().item(),  # worst layer's max/mean tokens per expert
        "drop_frac": dropped / load_LE.sum().item(),
        "expert_load": load_LE.long().tolist(),
    }


def train(cfg: Config, run_dir: Path) -> TrainResult:
    """Run the configured training to the end; see the module docstring."""
    t_cfg, device = cfg.train, resolve_device(cfg.train.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    if t_cfg.threads > 0:
        torch.set_num_threads(t_cfg.threads)
    retain_freed_host_memory()  # big per-step CPU tensors reuse freed memory instead of faulting in fresh pages
    torch.manual_seed(t_cfg.seed)

    data = load_splits(cfg.data, cfg.model.vocab_size)
    model = Transformer(cfg.model, cfg.router).to(device)  # the same weights on every rank (seeded)
    par = setup_parallel(cfg, model, device)
    engine = build_engine(model, t_cfg, par, device)
    counts = RoutingCounts(len(model.moe_layers()), cfg.model.num_experts) if par.rebalancer else None
    start_step = 0
    resume = t_cfg.resume
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # torchrun: restarts of this job so far
    if attempt > 0 and checkpoint_files.complete_checkpoints(checkpoint_files.checkpoint_dir(run_dir)):
        resume = str(run_dir)  # a restarted job continues from its own newest checkpoint, not train.resume's
        if par.info.is_main:
            print(f"restart {attempt}: resuming from the newest complete checkpoint in {run_dir}", file=sys.stderr)
    if resume:  # rank 0 verifies the checksums and picks the checkpoint; every rank reads its experts
        optimizer, scheduler = engine.portable()
        resumed = checkpoint.restore(checkpoint_files.agree(Path(resume), par.info.is_main), model, optimizer,
                                     scheduler, cfg, par.info.rank, par.dims, par.expert_placement,
                                     keep_saved_placement=par.rebalancer is not None)  # fmt: skip
        engine.load_portable(optimizer, scheduler)
        start_step = resumed.step
        if par.rebalancer is not None:
            par.rebalancer.placement = resumed.placement
            if resumed.routing_window is not None and par.info.is_main:  # the window's global counts, once
                counts.local = resumed.routing_window

    main = par.info.is_main  # only rank 0 prints, plots and logs
    bar = tqdm(
        total=t_cfg.steps,
        initial=start_step,
        disable=not (cfg.logger.progress and main),
        file=sys.stderr,
        dynamic_ncols=True,
        desc="train",
        unit="step",
    )
    log_cfg = cfg.logger if main else LoggerConfig(console=False, progress=False, jsonl=False, plots=False)
    loggers = Loggers(log_cfg, run_dir, cfg, write=bar.write)
    n_params = sum(p.numel() for p in model.parameters())
    say = print if main else (lambda *args, **kwargs: None)
    exchange = f", tokens exchanged over {cfg.comm.backend}" if par.dims.ep_enabled else ""
    engine_name = f"deepspeed (ZeRO {t_cfg.zero_stage})" if t_cfg.engine == "deepspeed" else "native"
    say(
        f"epmoe: {n_params / 1e6:.2f}M parameters on rank 0, {len(model.moe_layers())} MoE layers, device {device}, "
        f"world {par.info.world} (ep {par.dims.ep}{exchange}), engine {engine_name}, data {data.description}; "
        f"run dir {run_dir}",
        file=sys.stderr,
    )
    result = TrainResult(run_dir)
    tuner = ChunkTuner(model) if par.dims.ep_enabled and cfg.comm.chunks == "auto" else None
    trace = RoutingTrace(log_cfg.routing_trace_every, log_cfg.routing_trace_tokens, cfg.model.num_experts,
                         par.dims.ep, par.info.world)  # fmt: skip
    tokens_per_step = t_cfg.batch_size * cfg.data.seq_len * t_cfg.grad_accum * par.info.world

    def save_checkpoint(step: int) -> Path:  # a collective: every rank writes its shard
        optimizer, scheduler = engine.portable()
        return checkpoint.save(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                               rank=par.info.rank, dims=par.dims, placement=par.expert_placement,
                               routing_window=counts.local if counts is not None else None,
                               keep=t_cfg.keep_checkpoints)  # fmt: skip

    stop = _StopRequest() if par.info.world > 1 else None  # Ctrl-C: every rank stops after the same step

    completed = start_step  # optimizer steps whose effect is in the model
    try:
        for step in range(start_step, t_cfg.steps):
            t0 = time.perf_counter()

            def on_routing(micro: int, topk_idx_YTK: torch.Tensor, step: int = step) -> None:
                if micro == 0 and trace.wants(step + 1):
                    trace.add(step + 1, topk_idx_YTK)
                if counts is not None:
                    counts.add(topk_idx_YTK)

            fault = t_cfg.fault
            if fault.kill_rank == par.info.rank and fault.at_step == step + 1 and attempt == 0:
                print(f"fault drill: rank {par.info.rank} exits abruptly at step {step + 1}", file=sys.stderr)
                os._exit(17)  # no cleanup, no checkpoint: as if the process had been killed
            if tuner is not None:
                chunks_now = tuner.before_step(step - start_step)
            try:
                record = train_step(engine, data, cfg, device, step, par=par, on_routing=on_routing)
            except NonFiniteStep as e:  # train.on_nonfinite=abort: keep the last good state, then stop
                path = save_checkpoint(completed) if completed > start_step else None
                kept = f"; last good state (step {completed}) saved to {path}" if path else ""
                raise TrainingAborted(f"{e}{kept}; lower train.lr, or train.on_nonfinite=skip") from None
            if tuner is not None:
                record["comm_chunks"] = chunks_now
                if (chosen := tuner.after_step(step - start_step, time.perf_counter() - t0)) is not None:
                    medians = ", ".join(f"{c}: {s:.3f}" for c, s in tuner.medians_s.items())
                    say(f"comm.chunks=auto: chose {chosen} (median step seconds summed over ranks: {medians})")
            if par.timers:  # this step's exchange / exposed / expert-compute time per MoE layer
                record.update(step_timing(par.timers))
            engine.schedule_step()
            completed = step + 1
            record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
            result.losses.append(record["loss"])
            last = completed == t_cfg.steps
            if par.rebalancer is not None and par.rebalancer.due(completed, last):
                moves = par.rebalancer.rebalance(model.moe_layers(), counts.take_global(), engine.optimizer)
                record.update(moves)
                if main:
                    bar.write(f"step {completed}: re-placed experts ({par.rebalancer.placement.origin}): imbalance "
                              f"{moves['placement_imbalance_old']:.3f} -> {moves['placement_imbalance_new']:.3f}, "
                              f"{moves['placement_bytes_moved'] / 1e6:.2f} MB moved")  # fmt: skip
            if t_cfg.eval_every and (completed % t_cfg.eval_every == 0 or last):
                result.val_loss = evaluate(model, data, cfg, device, par)
                record.update(val_loss=result.val_loss, val_bpb=result.val_loss / LN2)
                step_timing(par.timers)  # evaluation's exchanges are not a training step's
            loggers.log(record, console=completed % t_cfg.log_every == 0 or "val_loss" in record or last)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if t_cfg.checkpoint_every and completed % t_cfg.checkpoint_every == 0 and not last:
                save_checkpoint(completed)
            if stop is not None and not last and stop.agreed():
                raise KeyboardInterrupt
        bar.close()
        if result.val_loss is None:  # eval_every=0 (or nothing left to run): validate once at the end
            result.val_loss = evaluate(model, data, cfg, device, par)
        result.checkpoint = save_checkpoint(t_cfg.steps)
        timing = run_summary(loggers.history)
        if timing:
            say(
                "exchange per MoE layer, mean ms/step: in flight {mean_exchange_ms}, exposed {mean_exposed_ms}, "
                "expert compute {mean_expert_ms}; hidden fraction {hidden_frac}".format(**timing)
            )
        loggers.summary({"val_loss": result.val_loss, "val_bpb": result.val_bpb, "steps": t_cfg.steps, **timing})
        say(f"done: held-out {result.val_bpb:.4f} bits/token (cross-entropy {result.val_loss:.4f} nats)")
        if t_cfg.sample_bytes and cfg.data.kind != "bin":
            text = sample_text(model, data, cfg, device)  # every rank: the EP exchange needs them all
            say("sample:\n" + text)
        if log_cfg.plots:
            say(f"plot: {plot_run(loggers.history, run_dir / 'training.png')}")
        if (trace_path := trace.save(run_dir)) is not None:
            say(f"routing trace ({len(trace.steps)} samples): {trace_path}")
        if log_cfg.jsonl:
            say(f"metrics: {run_dir / 'metrics.jsonl'}")
        if loggers.wandb_dir is not None:
            say(f"wandb ({cfg.logger.wandb_mode}): {loggers.wandb_dir}")
    except KeyboardInterrupt:
        bar.close()
        trace.save(run_dir)
        in_step = stop is not None and not stop.agreed_at_step_end  # ranks may be mid-collective: no save
        if start_step < completed < t_cfg.steps and not in_step:  # resume with train.resume=<run dir>
            saved = save_checkpoint(completed)
            say(f"interrupted: saved {saved}", file=sys.stderr)
        raise
    finally:
        bar.close()
        loggers.close()
        if stop is not None:
            stop.close()
    return result


class _StopRequest:
    """Ctrl-C under several ranks: the first SIGINT on any rank sets a flag; after each step the
    ranks agree on it (one all-reduce) and all stop after that same step, so every rank can join
    the interrupt checkpoint. A second SIGINT stops at once, without a checkpoint."""

    def __init__(self) -> None:
        self.requested = self.agreed_at_step_end = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank asked to stop (a collective: every rank calls it after each step)."""
        self.agreed_at_step_end = all_reduce_sum_(torch.tensor([int(self.requested)]))[0].item() > 0
        return self.agreed_at_step_end

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def build_engine(model: Transformer, cfg: TrainConfig, par: Parallel, device: torch.device) -> Engine:
    if cfg.engine == "deepspeed":
        from epmoe.train.deepspeed_engine import DeepSpeedEngine  # DeepSpeed is imported only when asked for

        return DeepSpeedEngine(model, cfg, par, device)
    return NativeEngine(model, cfg, par, device)


def train_step(
    engine: Engine,
    data: TokenSplits,
    cfg: Config,
    device: torch.device,
    step: int,
    par: Parallel | None = None,
    on_routing: Callable[[int, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """One optimizer step over grad_accum micro-batches; returns the step's metrics (all ranks).
    on_routing(micro, topk_idx_YTK) sees every micro-batch's expert choices (Y MoE layers)."""
    t_cfg = cfg.train
    par = par or Parallel.single(cfg.model.num_experts)
    global_batch = t_cfg.batch_size * par.info.world
    moe_layers = engine.model.moe_layers()
    load_LE = torch.zeros(len(moe_layers), cfg.model.num_experts, dtype=torch.long, device=device)
    ce_sum = aux_sum = z_sum = 0.0
    dropped = 0
    for micro in range(t_cfg.grad_accum):
        # the global batch depends only on (seed, micro, step): any world size sees the same data
        x_BS, y_BS = sample_batch(data.train, global_batch, cfg.data.seq_len, t_cfg.seed, micro, step)
        x_BS, y_BS = par.my_slice(x_BS), par.my_slice(y_BS)
        out = engine.forward(x_BS.to(device))
        ce = lm_loss(out.logits_BSV, y_BS.to(device))
        if t_cfg.fault.nan_at_step == step + 1 and par.info.rank == 0:
            ce = ce * float("nan")  # the injected fault of train.fault.nan_at_step
        aux, z = _routing_losses(out.routings, ce)
        engine.backward((ce + aux + z) / t_cfg.grad_accum, last=micro == t_cfg.grad_accum - 1)
        ce_sum, aux_sum, z_sum = ce_sum + ce.item(), aux_sum + aux.item(), z_sum + z.item()
        for layer, routing in enumerate(out.routings):
            load_LE[layer] += routing.counts_E
            dropped += routing.dropped
        if on_routing is not None and out.routings:
            on_routing(micro, topk_of_layers(out.routings))
    ce_sum, aux_sum, z_sum = par.mean(ce_sum), par.mean(aux_sum), par.mean(z_sum)
    if par.info.world > 1:
        all_reduce_sum_(load_LE)  # the routers' bias must see the global load
        dropped = int(all_reduce_sum_(torch.tensor([dropped]))[0])

    n = t_cfg.grad_accum
    record: dict[str, Any] = {"step": step + 1, "loss": ce_sum / n, "lr": engine.lr}
    grad_norm = engine.prepare()  # None: the engine knows it only once it updates (ZeRO)
    # NOTE: the loss is a mean over ranks and the norm global, so every rank decides alike
    if math.isfinite(ce_sum) and (grad_norm is None or math.isfinite(grad_norm)):
        applied, grad_norm = engine.update()  # applied False: the engine discarded a non-finite step
    else:
        applied, grad_norm = False, engine.skip()
    record["grad_norm"] = grad_norm
    if not applied:
        if t_cfg.on_nonfinite == "abort":
            raise NonFiniteStep(f"non-finite training step {step + 1} (loss {ce_sum / n}, gradient norm {grad_norm})")
        return {**record, "skipped_nonfinite": 1}  # skip: no update, no balancing step; counted
    for layer, moe in enumerate(moe_layers):
        moe.router.update_bias(load_LE[layer])
    record.update(routing_metrics(load_LE.cpu(), dropped, aux_sum / n, z_sum / n))
    return record


def _routing_losses(routings: list[Routing], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zero = like.new_zeros(())
    return sum((r.aux_loss for r in routings), zero), sum((r.z_loss for r in routings), zero)


def sample_text(model: Transformer, data: TokenSplits, cfg: Config, device: torch.device) -> str:
    """Continue the first line of a held-out window; bytes decoded leniently."""
    prompt_S = data.val[: min(64, cfg.data.seq_len)].long().to(device)
    g = torch.Generator(device=device).manual_seed(cfg.train.seed)
    model.eval()
    with autocast(device, cfg.train.precision):
        tokens = model.generate(prompt_S, cfg.train.sample_bytes, generator=g)
    model.train()
    return bytes(tokens.clamp(0, 255).tolist()).decode("utf-8", errors="replace")
