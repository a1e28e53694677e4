"""The training program: build, resume, step, evaluate, finish.

`train(cfg, run_dir)` takes a validated `Config` and a run directory and returns a
`TrainResult`; Hydra and the command line stay in `__main__.py`. The pieces, in order:
1. build: the data, the single-device model on the `meta` device, `parallelize` (process group,
   data and expert parallelism, placement, timers, tuner, rebalancer, FSDP2), then only this
   rank's part allocated and initialised (values that depend on the seed and each tensor's name,
   not on the layout: epmoe/model/init.py), the engine, the loggers and the hooks (hooks.py);
   Before any of it, the checks of preflight.py (one line each), and rank 0 locks the run
   directory (run_lock.py) for the run's life;
2. resume: from `train.resume`, or after a restart (torchrun, a Slurm requeue) from the run's own
   newest checkpoint; metrics.jsonl keeps the records up to that step, so each step is in it once;
3. step: the hooks before, `train_step` (step.py), the hooks after, logging, evaluation every
   `eval_every` steps, a checkpoint every `checkpoint_every`; a SIGINT, SIGTERM or SIGUSR1 on any
   rank stops every rank after the same step, with a checkpoint (stop.py);
4. finish: the final evaluation and checkpoint, the run's summary, a text sample, plots.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from epmoe.comm.process import all_reduce_sum_, ranks_on_this_node, restart_count
from epmoe.config import Config, ConfigError, LoggerConfig, TrainConfig
from epmoe.host_memory import retain_freed_host_memory
from epmoe.model.init import build_on_meta
from epmoe.model.moe import moe_layers
from epmoe.model.size import training_flops_per_token
from epmoe.model.transformer import Transformer
from epmoe.parallel.materialize import materialize
from epmoe.parallel.parallelize import Parallel, parallelize
from epmoe.parallel.timing import run_summary
from epmoe.train import checkpoint_files, checkpoint_state, preflight
from epmoe.train.console import human
from epmoe.train.data import TokenSplits, fingerprint, load_splits
from epmoe.train.engine import Engine, NativeEngine, autocast
from epmoe.train.hooks import FaultDrill, build_hooks, routing_callback
from epmoe.train.init_from import starting_point
from epmoe.train.loggers import Loggers
from epmoe.train.plots import expert_load_images, plot_run, run_title
from epmoe.train.routing_stats import RoutingCounts, RoutingTrace
from epmoe.train.run_lock import RunLock
from epmoe.train.step import NonFiniteStep, evaluate, train_step
from epmoe.train.stop import Preempted, StopRequest
from epmoe.train.throughput import Throughput, device_peak, slow_bf16_warning

LN2 = math.log(2)


class TrainingAborted(RuntimeError):
    """The run stopped itself (a non-finite step); the message says where and what was kept."""


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float] = field(default_factory=list)  # training loss (cross-entropy) per step run
    val_loss: float | None = None  # final held-out cross-entropy, nats per token
    checkpoint: Path | None = None
    val_bytes_per_token: float | None = 1.0  # of the held-out text; None for token files (bin)

    @property
    def val_bits_per_token(self) -> float | None:
        return None if self.val_loss is None else self.val_loss / LN2

    @property
    def val_bpb(self) -> float | None:
        """Held-out bits per byte of text, whatever the tokenizer: bits/token / (bytes/token);
        None for token files, whose bytes are unknown."""
        bits, per_token = self.val_bits_per_token, self.val_bytes_per_token
        return None if bits is None or per_token is None else bits / per_token


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device; use train.device=cpu")
    return torch.device(name)


def build_engine(model: Transformer, cfg: TrainConfig, par: Parallel, device: torch.device) -> Engine:
    if cfg.engine == "deepspeed":
        from epmoe.train.deepspeed_engine import DeepSpeedEngine  # DeepSpeed is imported only when asked for

        return DeepSpeedEngine(model, cfg, par, device)
    return NativeEngine(model, cfg, par, device)


class Trainer:
    """One run of the configured training; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: Path):
        """1. build (collective when world > 1)."""
        self.cfg, self.run_dir = cfg, run_dir
        t_cfg, self.device = cfg.train, resolve_device(cfg.train.device)
        preflight.check(cfg, run_dir, ranks_on_this_node(), restart_count(), lock=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        if t_cfg.threads > 0:
            torch.set_num_threads(t_cfg.threads)
        retain_freed_host_memory()  # big per-step CPU tensors reuse freed memory instead of faulting in fresh pages
        torch.manual_seed(t_cfg.seed)

        self.data: TokenSplits = load_splits(cfg.data, cfg.model.vocab_size)
        if t_cfg.init_from and not t_cfg.resume:
            self.model, self.par = self._start_from(Path(t_cfg.init_from))
        else:  # built on meta, parallelised, then only this rank's part allocated and initialised
            self.model, plan = build_on_meta(cfg.model, cfg.router, t_cfg.seed)
            self.par = parallelize(self.model, cfg, self.device)
            materialize(self.model, plan, self.par.local_expert_ids(self.model), self.device)
        self.lock = self._lock_run_dir()
        self.engine = build_engine(self.model, t_cfg, self.par, self.device)
        self.num_moe_layers = len(moe_layers(self.model))
        self.moe_blocks = self.model.moe_blocks()  # the block index of each MoE layer, for metric names
        self.counts = RoutingCounts(self.num_moe_layers, cfg.model.num_experts) if self.par.rebalancer else None
        self.start_step = self.completed = 0  # completed: optimizer steps whose effect is in the model

        self.main = self.par.info.is_main  # only rank 0 prints, plots and logs
        # the data's fingerprint for the manifests, taken once (rank 0): it hashes the ends of
        # every file of the corpus (1,790 for the stdlib one), which each save would repeat
        self.data_source = fingerprint(cfg.data) if self.main else None
        self.log_cfg = cfg.logger if self.main else LoggerConfig(console=False, progress=False, jsonl=False,
                                                                 plots=False)  # fmt: skip
        self.trace = RoutingTrace(self.log_cfg.routing_trace_every, self.log_cfg.routing_trace_tokens,
                                  cfg.model.num_experts, self.par.dims.ep, self.par.info.world)  # fmt: skip
        self.hooks = build_hooks(self)
        self.result = TrainResult(run_dir, val_bytes_per_token=self.data.val_bytes_per_token)
        self.tokens_per_step = t_cfg.batch_size * cfg.data.seq_len * t_cfg.grad_accum * self.par.info.world
        compute_dtype = torch.bfloat16 if t_cfg.precision == "bf16" else torch.float32
        peak = device_peak(self.device, t_cfg.peak_tflops, compute_dtype)
        if self.main and (warning := slow_bf16_warning(peak, self.device)):
            print(warning, file=sys.stderr)
        self.throughput = Throughput(training_flops_per_token(cfg.model, cfg.router, cfg.data.seq_len), peak,
                                     self.tokens_per_step, self.par.info.world, self.device)  # fmt: skip
        self.bar: tqdm | None = None
        self.loggers: Loggers | None = None
        self.stopped = False  # by a signal, with its checkpoint saved

    def _start_from(self, path: Path) -> tuple[Transformer, Parallel]:
        model, par, line = starting_point(path).load(self.cfg, self.device)
        if par.info.is_main:
            print(line, file=sys.stderr)
        return model, par

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 takes the run directory's lock; every rank raises if it could not (a collective)."""
        lock, error = None, None
        if self.par.info.is_main:
            try:
                lock = RunLock(self.run_dir)
            except ConfigError as e:
                error = e
        failed_1 = all_reduce_sum_(torch.tensor([float(error is not None)]))
        if error is not None:
            raise error
        if failed_1.item() > 0:
            raise ConfigError(f"run directory {self.run_dir} is in use by another run (rank 0 could not lock it)")
        return lock

    # -- output ----------------------------------------------------------------------------------

    def say(self, *args: Any, **kwargs: Any) -> None:
        """print, on rank 0 only."""
        if self.main:
            print(*args, **kwargs)

    def write(self, line: str) -> None:
        """A line on rank 0 that does not break the progress bar."""
        if self.main:
            self.bar.write(line)

    def _open_outputs(self) -> None:
        """The header, then the progress bar and the loggers (the header must not land inside the bar)."""
        cfg, t_cfg, par = self.cfg, self.cfg.train, self.par
        n_params = sum(p.numel() for p in self.model.parameters())
        exchange = f", tokens exchanged over {cfg.comm.backend}" if par.dims.ep_enabled else ""
        engine_name = f"deepspeed (ZeRO {t_cfg.zero_stage})" if t_cfg.engine == "deepspeed" else "native"
        self.say(
            f"epmoe: {n_params / 1e6:.2f}M parameters on rank 0, {self.num_moe_layers} MoE layers, "
            f"device {self.device}, world {par.info.world} (ep {par.dims.ep}{exchange}), engine {engine_name}, "
            f"data {self.data.description}; run dir {self.run_dir}",
            file=sys.stderr,
        )
        if par.fsdp_summary:
            self.say(par.fsdp_summary, file=sys.stderr)
        peak = self.throughput.peak
        over = f"a peak of {peak.tflops:.3g} TFLOP/s per device ({peak.source})" if peak.tflops else peak.source
        self.say(f"mfu: {self.throughput.flops_per_token / 1e6:,.2f} MFLOP per training token (epmoe/model/size.py) "
                 f"over {over}", file=sys.stderr)  # fmt: skip
        self.bar = tqdm(total=t_cfg.steps, initial=self.start_step, disable=not (cfg.logger.progress and self.main),
                        file=sys.stderr, dynamic_ncols=True, desc="train", unit="step")  # fmt: skip
        self.loggers = Loggers(self.log_cfg, self.run_dir, cfg, write=self.bar.write, start_step=self.start_step)
        if self.start_step and self.loggers.history:
            self.plot()  # a resumed run's figure shows the whole run from the start

    def plot(self) -> None:
        """Redraw training.png from the whole history (logger.plots), and send the expert-load
        heatmaps to the dashboards (rank 0; at each evaluation and at the end)."""
        history = self.loggers.history
        if self.log_cfg.plots:
            plot_run(history, self.run_dir / "training.png", run_title(self.run_dir, self.cfg, self.par.info.world))
        if self.loggers.takes_images and history and (images := expert_load_images(history)):
            self.loggers.log_images(history[-1]["step"], images)

    # -- 2. resume -------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from train.resume, or (a torchrun restart) from the run's own newest checkpoint."""
        par, resume = self.par, self.cfg.train.resume
        restart = par.info.restart
        own = restart > 0 and bool(checkpoint_files.complete_checkpoints(checkpoint_files.checkpoint_dir(self.run_dir)))
        if own:
            resume = str(self.run_dir)  # a restarted job continues from its own newest checkpoint, not train.resume's
            self.say(f"restart {restart}: resuming from the newest complete checkpoint in {self.run_dir}",
                     file=sys.stderr)  # fmt: skip
        if not resume:
            return
        # rank 0 verifies the checksums and picks the checkpoint; every rank reads its experts
        ckpt = checkpoint_files.agree(Path(resume), self.main)
        if not own:  # (a restart whose checkpoint is the last step's only finishes)
            preflight.check_resume(self.cfg, ckpt)  # touches nothing when train.steps is not beyond it
        optimizer, scheduler = self.engine.portable()
        resumed = checkpoint_state.restore(ckpt, self.model, optimizer, scheduler, self.cfg, par.info.rank, par.dims,
                                           par.placement, keep_saved_placement=par.rebalancer is not None,
                                           data_source=self.data_source, shards=par.shards)  # fmt: skip
        self.engine.load_portable(optimizer, scheduler)
        self.start_step = self.completed = resumed.step
        if resumed.placement is not None:
            par.apply_placement(self.model, resumed.placement)
        if self.counts is not None and resumed.routing_window is not None and self.main:
            self.counts.local = resumed.routing_window  # the window's global counts, once
        self.say(f"resumed from step {resumed.step} of {ckpt}", file=sys.stderr)

    def save_checkpoint(self, step: int) -> Path:
        """A collective: every rank writes its shard."""
        optimizer, scheduler = self.engine.portable()
        return checkpoint_state.save(self.run_dir, step, model=self.model, optimizer=optimizer, scheduler=scheduler,
                                     cfg=self.cfg, rank=self.par.info.rank, dims=self.par.dims,
                                     placement=self.par.placement,
                                     routing_window=self.counts.local if self.counts is not None else None,
                                     keep=self.cfg.train.keep_checkpoints,
                                     shard_written=FaultDrill.in_save(self.cfg, self.par.info, step),
                                     data_source=self.data_source, shards=self.par.shards)  # fmt: skip

    # -- 3. step and evaluate --------------------------------------------------------------------

    def evaluate(self) -> float:
        val_loss = evaluate(self.model, self.data, self.cfg, self.device, self.par)
        for hook in self.hooks:
            hook.after_evaluate(self)
        return val_loss

    def step(self, step: int, stop: StopRequest | None) -> None:
        """Training step `step` (0-based) with everything around it: hooks, logging, evaluation,
        checkpoint."""
        t_cfg = self.cfg.train
        t0 = time.perf_counter()
        for hook in self.hooks:
            hook.before_step(self, step)
        try:
            record = train_step(self.engine, self.data, self.cfg, self.device, step, par=self.par,
                                on_routing=routing_callback(self.hooks, step), stop=stop)  # fmt: skip
        except NonFiniteStep as e:  # train.on_nonfinite=abort: keep the last good state, then stop
            path = self.save_checkpoint(self.completed) if self.completed > self.start_step else None
            kept = f"; last good state (step {self.completed}) saved to {path}" if path else ""
            raise TrainingAborted(f"{e}{kept}; lower train.lr, or train.on_nonfinite=skip") from None
        for hook in self.hooks:
            hook.after_step(self, step, record, time.perf_counter() - t0)
        self.engine.schedule_step()
        self.completed = step + 1
        record.update(self.throughput.step_metrics(time.perf_counter() - t0, self.completed))
        self.result.losses.append(record["loss"])
        last = self.completed == t_cfg.steps
        for hook in self.hooks:
            hook.after_update(self, self.completed, record, last)
        if t_cfg.eval_every and (self.completed % t_cfg.eval_every == 0 or last):
            self.result.val_loss = self.evaluate()
            record.update(val_loss=self.result.val_loss, val_bits_per_token=self.result.val_bits_per_token)
            if self.result.val_bpb is not None:
                record["val_bpb"] = self.result.val_bpb
        logged = self.completed % t_cfg.log_every == 0 or "val_loss" in record or last  # alike on every rank
        if logged:
            record["mem_gib"] = self.throughput.memory_gib()  # a collective, once per logging step
        self.loggers.log(record, console=logged)
        if "val_loss" in record:
            self.plot()
        self.bar.set_postfix_str(f"loss {record['loss']:.3f}, {human(record['tokens_per_s'])} tok/s", refresh=False)
        self.bar.update(1)
        if t_cfg.checkpoint_every and self.completed % t_cfg.checkpoint_every == 0 and not last:
            self.save_checkpoint(self.completed)

    # -- 4. finish -------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        cfg, result = self.cfg, self.result
        self.bar.close()
        if result.val_loss is None:  # eval_every=0 (or nothing left to run): validate once at the end
            result.val_loss = self.evaluate()
        result.checkpoint = self.save_checkpoint(cfg.train.steps)
        timing = run_summary(self.loggers.history)
        if timing:
            self.say(
                "exchange per MoE layer, mean ms/step: in flight {mean_exchange_ms}, exposed {mean_exposed_ms}, "
                "expert compute {mean_expert_ms}; hidden fraction {hidden_frac}".format(**timing)
            )
        self.loggers.summary({"val_loss": result.val_loss, "val_bpb": result.val_bpb,
                              "val_bits_per_token": result.val_bits_per_token, "steps": cfg.train.steps,
                              **timing})  # fmt: skip
        bits = (f"{result.val_bits_per_token:.4f} bits/token" if result.val_bpb is None
                else f"{result.val_bpb:.4f} bits/byte")  # fmt: skip
        self.say(f"done: held-out {bits} (cross-entropy {result.val_loss:.4f} nats/token)")
        if cfg.train.sample_bytes and self.data.tokenizer is not None:
            self.say("sample:\n" + self.sample_text())  # every rank samples: the EP exchange needs them all
        if self.loggers.history and "val_loss" not in self.loggers.history[-1]:
            self.plot()  # (an evaluation at the last step drew it already)
        if self.log_cfg.plots:
            self.say(f"plot: {self.run_dir / 'training.png'}")
        if (trace_path := self.trace.save(self.run_dir)) is not None:
            self.say(f"routing trace ({len(self.trace.steps)} samples): {trace_path}")
        if self.log_cfg.jsonl:
            self.say(f"metrics: {self.run_dir / 'metrics.jsonl'}")
        if self.loggers.wandb_dir is not None:
            self.say(f"wandb ({cfg.logger.wandb_mode}): {self.loggers.wandb_dir}")
        return result

    def sample_text(self) -> str:
        """Continue the first held-out tokens, decoded by the data's tokenizer (bytes leniently)."""
        cfg, device = self.cfg, self.device
        prompt_S = self.data.val[: min(64, cfg.data.seq_len)].long().to(device)
        g = torch.Generator(device=device).manual_seed(cfg.train.seed)
        self.model.eval()
        with autocast(device, cfg.train.precision):
            tokens = self.model.generate(prompt_S, cfg.train.sample_bytes, generator=g)
        self.model.train()
        return self.data.tokenizer.decode(tokens.tolist())

    def run(self) -> TrainResult:
        """2-4: resume, every step left, finish; or stop on a signal (stop.py) with a checkpoint."""
        steps = self.cfg.train.steps
        stop = StopRequest()
        try:
            self.resume()
            self._open_outputs()
            for step in range(self.start_step, steps):
                self.step(step, stop)
                if stop.agreed is not None and self.completed < steps:
                    self._stop(stop)
            return self.finish()
        except KeyboardInterrupt:  # a second Ctrl-C, or one in a single process mid-step
            if self.bar is not None:
                self.bar.close()
            self.trace.save(self.run_dir)
            # several ranks may be mid-collective: no save (the newest complete checkpoint stays)
            if self.par.info.world == 1 and not self.stopped and self.start_step < self.completed < steps:
                self.say(f"interrupted: saved {self.save_checkpoint(self.completed)}", file=sys.stderr)
            raise
        finally:
            stop.close()
            if self.bar is not None:
                self.bar.close()
            if self.loggers is not None:
                self.loggers.close()
            if self.lock is not None:
                self.lock.release()

    def _stop(self, stop: StopRequest) -> None:
        """Every rank, after the same step: save where the run stands, then end it (raises)."""
        self.stopped = True
        self.bar.close()
        self.trace.save(self.run_dir)
        saved = self.save_checkpoint(self.completed) if self.completed > self.start_step else None
        if stop.agreed == signal.SIGINT:
            self.say(f"interrupted after step {self.completed}: saved {saved}", file=sys.stderr)
            raise KeyboardInterrupt
        raise Preempted(stop.agreed.name, self.completed, saved, self.run_dir, self.main)


def train(cfg: Config, run_dir: Path) -> TrainResult:
    """Run the configured training to the end; see the module docstring."""
    return Trainer(cfg, run_dir).run()
