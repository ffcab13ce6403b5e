"""The built-in continuous trainer: `python -m trainer [--config PATH] [--resume latest|best|none|STEP|PATH]`.

Trains the small GPT on the configured data forever (or to trainer.max_steps), checkpoints every N
steps through CheckpointManager, evaluates, tracks best, pins epoch ends, logs metrics to
logs/metrics.jsonl. SIGINT/SIGTERM: finish the step, save, exit 128+signal
(143 for SIGTERM: stopped, not finished; exit 0 means finished). Under torchrun: DDP with gloo on
CPU (nccl on GPUs); rank 0 writes; every rank loads the checkpoint rank 0 chose.

trainer.device (auto: a CUDA GPU when present; under torchrun cuda:LOCAL_RANK, bound before the process
group exists), trainer.precision (autocast; fp16 with a gradient scaler saved in every checkpoint) and
trainer.deterministic are decided in ckpt_daemon/device.py and applied by ckpt_daemon/devio.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ckpt_daemon import device as dv
from ckpt_daemon import devio, runtime
from ckpt_daemon.checkpoint import CheckpointManager, capture_rng, restore_rng
from ckpt_daemon.config import Config
from ckpt_daemon.logs import append_jsonl
from ckpt_daemon.models.gpt import GPT, GPTConfig
from ckpt_daemon.store import delete
from trainer.data import Sampler, load_corpus, val_batches

log = logging.getLogger("trainer")


class StopFlag:
    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def __call__(self, signum, _frame) -> None:
        if self.signal is None:
            log.info("received %s: finishing this step, saving, then exiting", signal.Signals(signum).name)
        self.signal = signum


def lr_lambda(cfg) -> callable:
    warm, cycle, floor = cfg.warmup_steps, cfg.lr_cycle_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = ((step - warm) % cycle) / cycle
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def build(cfg: Config, vocab_size: int, device: Optional[torch.device] = None):
    device = device if device is not None else torch.device("cpu")
    tc = cfg.trainer
    mc = GPTConfig(vocab_size=vocab_size, block_size=tc.model.block_size, n_layer=tc.model.n_layer,
                   n_head=tc.model.n_head, n_embd=tc.model.n_embd, dropout=tc.model.dropout)
    model = GPT(mc).to(device)  # initialised on the CPU (the same weights on every device), then moved
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.learning_rate, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    return model, mc, opt, sched


@torch.no_grad()
def evaluate(model: GPT, corpus, cfg, placement: Optional[dv.Placement] = None) -> float:
    model.eval()
    dev = torch.device(placement.device) if placement else torch.device("cpu")
    losses = []
    for x, y in val_batches(corpus.val, cfg.model.block_size, cfg.batch_size, cfg.eval_batches):
        with devio.autocast(placement) if placement else contextlib.nullcontext():
            losses.append(model(x.to(dev), y.to(dev))[1].float().item())
    model.train()
    return sum(losses) / len(losses)


def _remove_dead_saves(ckpt_dir: Path) -> None:
    """Saves killed half-way leave scratch folders whose lock nobody holds; live ones keep theirs."""
    for sid in delete.clean_scratch(ckpt_dir):
        log.warning("removed %s, left by a save that was interrupted", sid)


def _append_metrics(path: Path, rec: dict) -> None:
    """metrics.jsonl is bookkeeping: a full disk must not stop training (logged once)."""
    try:
        append_jsonl(path, rec)
    except OSError as exc:
        if not getattr(_append_metrics, "warned", False):
            _append_metrics.warned = True
            log.warning("cannot append to %s (%s); training goes on without metrics lines", path, exc)


def run(cfg: Config, resume: str, max_steps: Optional[int] = None) -> int:
    tc = cfg.trainer
    job = dv.job_from_env()
    world, rank, distributed = job.world, job.rank, job.distributed
    # The device first: a rank binds cuda:LOCAL_RANK before the process group exists, so NCCL and every
    # collective use its own GPU (NCCL on GPUs, gloo on CPUs: device.backend_for).
    placement = devio.setup(tc.device, tc.precision, tc.deterministic, job)
    device = torch.device(placement.device)
    if distributed:
        dist.init_process_group(placement.backend)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    # Under the daemon, its own resolution of the folders (made once, when it loaded the config) wins:
    # a checkpoints symlink re-pointed since never splits the run between two folders.
    ckpt_dir = Path(os.environ.get("CKPT_DAEMON_CHECKPOINTS") or cfg.checkpoint_dir)
    metrics_path = Path(os.environ.get("CKPT_DAEMON_METRICS") or cfg.log_dir / "metrics.jsonl")
    lock = runtime.TrainerLock(ckpt_dir).acquire() if rank == 0 else None
    if rank == 0:
        _remove_dead_saves(ckpt_dir)
    torch.manual_seed(tc.seed)
    corpus = load_corpus(cfg.data_path(), tc.data.synthetic_chars, tc.seed, tc.data.val_fraction)
    model, mc, opt, sched = build(cfg, corpus.vocab_size, device)
    scaler = devio.grad_scaler(placement)  # fp16 only; saved and restored with every checkpoint
    sampler = Sampler(corpus.train, tc.model.block_size, tc.batch_size, tc.seed, rank, world)
    # Memory-first checkpoints need the daemon, which persists them (it names the region in the environment).
    mem_cfg = cfg.checkpoints.memory
    # Under torchrun rank 0 writes the slots (every rank holds the same state) and every rank can read them.
    mem_dir = os.environ.get("CKPT_DAEMON_MEMORY") if mem_cfg.enabled else None
    if mem_cfg.enabled and not mem_dir and rank == 0:
        log.warning("checkpoints.memory.enabled is set, but memory checkpoints need the daemon (which persists them); "
                    "saving to disk every %d steps instead", tc.checkpoint_every_steps)
    mgr = CheckpointManager(ckpt_dir, best_metric=tc.best_metric, best_mode=tc.best_mode,
                            save_margin_bytes=int(cfg.disk.save_margin_mb * 2**20), patterns=cfg.checkpoints.pattern,
                            rank=rank, memory=mem_dir or False, memory_max_bytes=int(mem_cfg.max_gb * 2**30))
    step, resumed_from = 0, None
    torch.manual_seed(tc.seed + rank)  # per-rank stream for dropout; restored from the checkpoint on resume

    if resume != "none":
        how = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler, "restore_rng_state": False,
               "map_location": device}
        loaded = mgr.load(resume, **how) if rank == 0 else None
        if distributed:
            # Rank 0 chose, verified and loaded (a memory checkpoint or a folder); the others load exactly that.
            box = [loaded.source() if loaded is not None else None]
            dist.broadcast_object_list(box, src=0)
            if rank != 0 and box[0] is not None:
                loaded = mgr.load_same(box[0], **how)
        if loaded is not None:
            step = loaded.step
            resumed_from = loaded.path.name
            rng = loaded.extra.get("rng_ranks") or []
            if loaded.world_size == world and len(rng) == world:
                restore_rng(rng[rank])
                sampler.load_state(loaded.data_state)
            else:
                sampler.load_state(loaded.data_state)
                log.warning(
                    "resuming a run saved with %d process(es) on %d: the data order continues from the same "
                    "position, but per-rank random streams are reseeded, so losses will not repeat bit for bit",
                    loaded.world_size, world)
            if rank == 0:
                log.info("resumed from %s at step %d (epoch %d)%s", loaded.path.name, step, sampler.epoch,
                         " (read from the memory checkpoint)" if loaded.from_memory else "")
        elif rank == 0:
            log.info("no checkpoint in %s: starting fresh", ckpt_dir)
    elif rank == 0:
        log.info("--resume none: starting fresh at step 0")

    if rank == 0:
        log.info("training on %s%s", placement.device, "" if placement.precision == "fp32" else f" with {placement.precision} autocast")
    ddp_model = model
    if distributed:
        # (its construction is a collective: every rank has loaded its state before rank 0 touches the slots)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[placement.index] if placement.device_type == "cuda" else None)
    if mem_dir and rank == 0:
        # the slots' space, pages and (for a GPU) pinned registration, paid now on the writer's thread while
        # training starts, not inside the first memory saves
        mgr.reserve_memory(model=model, optimizer=opt, background=True)
    limit = max_steps if max_steps is not None else tc.max_steps
    model_cfg = {"model": mc.to_dict(), "vocab": corpus.vocab, "trainer": cfg.trainer.model_dump(mode="json")}
    best: Optional[float] = mgr.best_value
    last_hb = 0.0
    t_last, tokens = time.perf_counter(), 0
    val_loss: Optional[float] = None

    def save(pin: Optional[str], blocking: bool, metrics: dict, memory: bool = False) -> None:
        rngs = [capture_rng()]
        if distributed:
            rngs = [None] * world
            dist.all_gather_object(rngs, capture_rng())
        if rank == 0:
            mgr.save(step, model=model, optimizer=opt, scheduler=sched, scaler=scaler, epoch=sampler.epoch,
                     data_state=sampler.state(), metrics=metrics, config=model_cfg, pin=pin, world_size=world,
                     extra={"rng_ranks": rngs}, rng={}, blocking=blocking, memory=memory)

    model.train()
    rc = 0
    try:
        while limit is None or step < limit:
            x, y, epoch_ended = sampler.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with devio.autocast(placement):
                _, loss = ddp_model(x, y)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)  # the clip sees the true gradients
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            lr = opt.param_groups[0]["lr"]
            if scaler:
                scaler.step(opt)  # skipped (and the scale lowered) when a gradient overflowed
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            tokens += x.numel() * world
            loss_v = loss.float().item()
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"loss became {loss_v} at step {step}; lower trainer.learning_rate")
            rec = {"step": step, "loss": loss_v, "lr": lr, "epoch": sampler.epoch}
            metrics = {"loss": loss_v}
            new_best = False
            if step % tc.eval_every_steps == 0:
                val_loss = evaluate(model, corpus, tc, placement)
                rec["val_loss"] = val_loss
                metrics["val_loss"] = val_loss
                better = best is None or (val_loss < best if tc.best_mode == "min" else val_loss > best)
                if better and tc.best_metric == "val_loss":
                    best, new_best = val_loss, True
            if rank == 0:
                _append_metrics(metrics_path, {**rec, "time": time.time()})
            stopping = stop.signal is not None
            if distributed:
                flag = torch.tensor([1 if stopping else 0], device=device)  # NCCL moves only GPU tensors
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            finished = limit is not None and step >= limit
            pin = f"end of epoch {sampler.epoch}" if epoch_ended else None
            if finished or stopping:
                save(pin, True, metrics)
            elif pin or new_best or (not mem_dir and step % tc.checkpoint_every_steps == 0):
                save(pin, not tc.async_save, metrics)
            elif mem_dir and step % mem_cfg.every_steps == 0:
                # memory-first: the daemon persists every persist_every-th of these, and the newest at a crash
                save(None, False, metrics, memory=True)
            if rank == 0:
                now = time.perf_counter()
                if step % tc.log_every_steps == 0:
                    msg = f"step {step} | loss {loss_v:.4f} | lr {lr:.2e} | {tokens / (now - t_last):,.0f} tok/s | epoch {sampler.epoch}"
                    if "val_loss" in rec:
                        msg += f" | val_loss {rec['val_loss']:.4f}"
                    log.info(msg)
                    t_last, tokens = now, 0
                if now - last_hb > 1.0 or finished or stopping:
                    runtime.write_heartbeat(ckpt_dir, step=step, epoch=sampler.epoch, saving=mgr.saving,
                                            resumed_from=resumed_from, world_size=world, device=devio.report(placement))
                    last_hb = now
            if stopping and not finished:
                # Not finished: exit as a shell reports a death by that signal (143 for SIGTERM), so that a
                # supervisor which did not send it restarts training; only a finished run exits 0.
                rc = 128 + (stop.signal or signal.SIGTERM)
                log.info("stopped by signal at step %d after saving (exit %d: not finished)", step, rc)
                break
        else:
            if rank == 0:
                log.info("reached max_steps=%s", limit)
        mgr.close()
    finally:
        if lock:
            lock.release()
        if distributed:
            # Leave together: a rank that tears down gloo while rank 0 still saves aborts the job.
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
    return rc


def _warm_up() -> None:
    """What a warm spare does before it waits: one tiny training step, so that what torch imports or
    initialises on first use (the optimizer's first construction imports torch._dynamo, seconds) is done."""
    m = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m(torch.randn(2, 4)).square().mean().backward()
    opt.step()
    sched.step()


def main(argv: Optional[list[str]] = None) -> int:
    from ckpt_daemon import (
        memsave,  # noqa: F401  (imported before a warm spare waits, not after)
        spare,
    )
    from ckpt_daemon.cliutil import module_main
    from trainer.cli import add_train_arguments, run_train

    # The daemon's warm spare waits here, its imports done, until a restart is handed to it.
    if spare.ENV_FD in os.environ:
        _warm_up()
    spare.wait_for_handover()
    return module_main("python -m trainer", __doc__.split("\n\n")[0], add_train_arguments, run_train, argv)


if __name__ == "__main__":
    sys.exit(main())
