"""The built-in trainer: a plain loop over the public :class:`~spfde.controller.SpFDE` API.

SGD with momentum and weight decay, cosine learning rate (Table A3; block-wise when freezing),
label smoothing, evaluation each epoch, channels_last on CPU, AMP on CUDA. Every epoch ends with
an atomic checkpoint; a killed run resumed with ``resume=True`` ends bit-identical to an
uninterrupted one on CPU, because every random choice derives from ``(seed, purpose, epoch)``
and the checkpoint holds the model, optimizer, controller and RNG states.

Robustness (issue 15): checkpoints are verified and loaded without code execution
(:mod:`spfde.checkpoint`); a resumed run refuses a config.yaml edited since its checkpoint; a
NaN/inf training loss stops the run at that step (``train.on_nonfinite: stop``, exit 3) or skips
the step (``skip``); running out of memory while a run starts is a config error (exit 2).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spfde import distributed as dist_utils
from spfde.checkpoint import FORMAT, check_resume_config, load_latest, read_checkpoint, save_checkpoint
from spfde.config import Config, dump_config, load_config
from spfde.controller import SpFDE
from spfde.errors import ConfigError, NonFiniteLossError, SpfdeError, config_caused, first_line, memory_errors
from spfde.units import format_duration, time_to_acc_fields
from spfde.utils import (
    LOCK_NAME,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    lazy_parameters,
    make_generator,
    resolve_device,
    rng_states,
    seed_everything,
    set_rng_states,
    set_threads,
    state_dict_sha256,
)

CHECKPOINT_FORMAT = FORMAT


def _use_channels_last(cfg: Config, device: torch.device) -> bool:
    if cfg.train.channels_last == "on":
        return True
    if cfg.train.channels_last == "off":
        return False
    return device.type == "cpu"


def _use_amp(cfg: Config, device: torch.device) -> bool:
    if cfg.train.amp == "on":
        if device.type != "cuda":
            raise ConfigError("config field 'train.amp' = 'on' needs a CUDA device; use train.amp=auto or off on CPU")
        return True
    return cfg.train.amp == "auto" and device.type == "cuda"


def _density_note(cfg: Config, epoch: int) -> str:
    """MEST trains denser than its target until ``search_end`` (the soft bound s'): say so."""
    sp = cfg.sparsity
    if sp.method != "mest" or sp.target <= 0 or epoch >= cfg.search_end:
        return ""
    from spfde.sparsity import Schedule

    s = Schedule.from_config(cfg).sparsity_during(sp.target, epoch)
    if s >= sp.target:
        return ""
    return f" (MEST search phase at s'={s:.3f}; target {sp.target:.3f} from epoch {cfg.search_end})"


def check_model_output(model: nn.Module, example: torch.Tensor, num_classes: int, dataset: str) -> None:
    """One forward of one training image (eval mode, no gradient: nothing in the model changes)
    before anything else uses the model: it gives lazy modules (``LazyLinear``...) their shapes, and
    the built-in trainer's loss needs logits ``(N, num_classes)``, which is checked here instead of
    failing as an IndexError inside the loss. A model without any parameter is refused first:
    nothing of it could train (torch's optimizer would stop on it with a traceback)."""
    if next(model.parameters(), None) is None:
        raise SpfdeError(f"the model ({type(model).__name__}) has no parameters, so there is nothing to train; "
                         "it must register its layers as nn.Module attributes (nn.ModuleList for a list)")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except (TypeError, RuntimeError, ValueError, IndexError) as e:
        raise SpfdeError(f"the model's forward failed on one {dataset} image of shape {tuple(example.shape)} "
                         f"({type(e).__name__}: {first_line(e)[:200]}); it must take a "
                         "batch (N, C, H, W) and return logits (N, num_classes)") from None
    finally:
        model.train(was)
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[1] != num_classes:
        got = f"a tensor of shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
        raise SpfdeError(f"the model returns {got} for a batch of 1; the built-in trainer needs logits of shape "
                         f"(1, {num_classes}) for the {num_classes} classes of {dataset} (the model gets "
                         "num_classes=...: pass it on to its classifier)")


def _is_run_dir(out: Path) -> bool:
    return (out / "config.yaml").is_file() or (out / "checkpoints").is_dir()


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an output path that is a file, not writable, or a non-empty folder (unless ``force``,
    which only ever deletes a spfde run folder, never the current folder or one holding it)."""
    if out.exists() and not out.is_dir():
        raise SpfdeError(f"--out {str(out)!r} exists and is not a directory")
    # the lock file alone (a run killed as it started, or this process's own lock) is no content
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.exists() else []
    if entries:
        if not _is_run_dir(out):
            raise SpfdeError(f"output directory {str(out)!r} is not empty and is not a spfde run (it holds "
                             f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); choose another --out"
                             f"{' (--force only overwrites a run folder)' if force else ''}")
        if not force:
            raise SpfdeError(
                f"output directory {str(out)!r} holds a run; use --resume {out} to continue that run "
                "or --force to overwrite it")
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise SpfdeError(f"--force will not delete {str(out)!r}: it is the current folder or holds it; "
                             "run from another folder or choose another --out")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise SpfdeError(f"cannot create output directory {str(out)!r}: {str(parent)!r} is not a writable folder")


def prepare_out_dir(out: Path, force: bool) -> None:
    check_out_dir(out, force)
    if out.exists():
        import shutil

        for p in out.iterdir():
            if p.name == LOCK_NAME:  # this process's RunLock: removing it would let a second process lock
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpfdeError(f"cannot create output directory {str(out)!r}: {e.strerror}") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """One verified checkpoint file (:func:`spfde.checkpoint.read_checkpoint`)."""
    return read_checkpoint(path)


def check_device(name: str) -> torch.device:
    """``train.device`` as a device this machine has (a config error otherwise)."""
    device = resolve_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config field 'train.device' = {name!r} asks for a GPU but none is available; "
                              "use train.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"config field 'train.device' = {name!r}: this machine has "
                              f"{torch.cuda.device_count()} GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def _finite_grads(model: torch.nn.Module) -> bool:
    """All gradients finite (after DDP's all-reduce they are equal on every rank: one decision)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its profiling wrapper (0.17 ms per ViT-preset step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def amp_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """``scaler.step`` + ``scaler.update``; returns whether GradScaler skipped the step (its unscaled
    gradients held inf/NaN), read from the scale shrinking, as a 0-dim device tensor so that no host
    sync is added (``SpFDE.after_step`` syncs only when it records a statistic)."""
    scale = scaler._scale  # private: the public get_scale() would sync the device every step
    before = scale.clone() if torch.is_tensor(scale) else torch.tensor(scaler.get_scale())
    scaler.step(optimizer)
    scaler.update()
    after = scaler._scale if torch.is_tensor(scaler._scale) else torch.tensor(scaler.get_scale())
    return after < before


class Trainer:
    """Builds data, model, optimizer and controller from a config and runs the epochs."""

    def __init__(self, cfg: Config, out_dir: str | Path, quiet: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        check_device(cfg.train.device)
        # under torchrun: one process per device, decisions identical on every rank (docs/distributed.md)
        self.rank, self.world_size, local_rank = dist_utils.init_from_env(device=cfg.train.device)
        self.is_main = self.rank == 0
        self.quiet = quiet or not self.is_main
        self.device = resolve_device(cfg.train.device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
        self.threads = set_threads(cfg.train.threads)  # before any work: the rule reads the load at start
        self.channels_last = _use_channels_last(cfg, self.device)
        self.amp = _use_amp(cfg, self.device)

        from spfde.data import load_datasets, make_eval_loader, make_train_loader
        from spfde.models import create_model

        seed_everything(cfg.seed)
        self.train_set, self.test_set, self.info = load_datasets(cfg.data, seed=cfg.seed)
        example = self.train_set[0][0].unsqueeze(0)
        with config_caused():  # the model comes from the config alone
            model = create_model(cfg.model.name, num_classes=self.info.num_classes,
                                 in_channels=self.info.in_channels, width=cfg.model.width, **cfg.model.kwargs)
            # lazy modules take their shapes from this forward, before .to() can move them; any other
            # model is checked where it will run (a CUDA-only op would fail on the CPU)
            lazy = bool(lazy_parameters(model))
            if lazy:
                check_model_output(model, example, self.info.num_classes, self.info.name)
            self.model = model.to(self.device)
            if not lazy:
                check_model_output(self.model, example.to(self.device), self.info.num_classes, self.info.name)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # CPU: the fused kernel, one pass over all parameters instead of a foreach pass per operation
        # (0.5 ms less per ViT-preset step, issue 13; it rounds differently from foreach in the last
        # bit, and is as deterministic); CUDA: foreach, PyTorch's default there
        cpu = self.device.type == "cpu"
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov, foreach=not cpu, fused=cpu or None)
        example = example.to(self.device)
        snip = None
        if cfg.sparsity.method == "static" and cfg.sparsity.static_init == "snip":
            n = min(cfg.data.batch_size, len(self.train_set))
            items = [self.train_set[i] for i in range(n)]
            snip = (torch.stack([it[0] for it in items]).to(self.device),
                    torch.tensor([int(it[1]) for it in items], device=self.device))
        with config_caused():  # every input of the controller here comes from the config
            self.ctl = SpFDE(self.model, self.optimizer, cfg, train_size=len(self.train_set),
                             example_input=example, snip_batch=snip, rank=self.rank, world_size=self.world_size)
        # this trainer steps its own SGD and loads its state only through the controller (optimizer_loaded),
        # so pruned weights stay exactly zero through a step without re-masking (SparseEngine module doc)
        self.ctl.sparsity.optimizer_keeps_zeros = True
        # the module that runs forward: a DDP wrapper under torchrun, re-wrapped when freezing changes
        self.ddp = dist_utils.wrap_ddp(self.model, device_ids=[local_rank] if self.device.type == "cuda" else None)
        self.train_loader = make_train_loader(cfg.data, self.train_set, self.ctl.sampler, self.device,
                                              cfg.seed, channels_last=self.channels_last)
        self.eval_loader = make_eval_loader(cfg.data, self.test_set, self.device)
        self.ctl.cache.inputs = self.train_loader.inputs  # fills the activation cache at each freeze
        if self.rank:
            # the model and every controller decision are set up from the shared seed; from here the global
            # RNG only feeds the model's own randomness (dropout), which each rank draws for its own samples
            seed_everything(make_generator(cfg.seed, "rank", self.rank).initial_seed())
        self._rng_by_rank: list[Any] | None = None  # every rank's RNG states at the last epoch end (DDP)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.metrics: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.wall_s = 0.0
        self.tensorboard = None  # opened by run(): nothing is written before the output folder is ready
        self.last_rejected = False  # resume fell back to prev.pt: the next save overwrites the bad last.pt
        if cfg.logging.tensorboard and self.is_main:
            from spfde.report.tensorboard import require_tensorboard

            require_tensorboard()  # a missing package stops the run before anything is written

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, epoch: int) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.ctl.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_states(),
            "metrics": self.metrics,
            "wall_s": self.wall_s,
            "threads": self.threads.threads,
            "world_size": self.world_size,
        }
        if self._rng_by_rank is not None:
            state["rng_by_rank"] = self._rng_by_rank
        save_checkpoint(state, self.out / "checkpoints", rotate=not self.last_rejected)
        self.last_rejected = False

    def restore(self, ckpt: dict[str, Any], path: Path | None = None) -> None:
        try:
            self._restore(ckpt)
        except torch.cuda.OutOfMemoryError:
            raise  # not a mismatch: the checkpoint is fine, the device is full
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
            raise SpfdeError(
                f"{where} does not match this run's config.yaml ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "resume with the config the run was started with, or delete checkpoints/ to restart it") from None

    def _restore(self, ckpt: dict[str, Any]) -> None:
        # the controller first: it restores frozen blocks and per-block param groups the optimizer
        # state refers to
        self.model.load_state_dict(ckpt["model"])
        self.ctl.load_state_dict(ckpt["controller"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.ctl.optimizer_loaded()
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        by_rank = ckpt.get("rng_by_rank")
        set_rng_states(by_rank[self.rank] if isinstance(by_rank, list) and len(by_rank) == self.world_size
                       else ckpt["rng"])
        self.metrics = list(ckpt["metrics"])
        self.wall_s = float(ckpt["wall_s"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        if ckpt.get("threads"):
            self.threads = set_threads(self.cfg.train.threads, keep=int(ckpt["threads"]))

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        model, ctl = self.model, self.ctl
        ctl.start_epoch(epoch)
        self.ddp = dist_utils.maybe_rewrap_ddp(self.ddp)
        self.train_loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        count = 0
        bar = self._bar(len(self.train_loader), f"epoch {epoch}/{cfg.train.epochs - 1}")
        per_sample = cfg.sieving.criterion == "loss"  # the sieve ranks samples by their own loss
        losses = None
        steps = nonfinite = 0
        for step, (x, y, idx) in enumerate(self.train_loader):
            steps += 1
            with torch.autocast(self.device.type, enabled=self.amp):
                with ctl.cache.batch(x, idx):  # frozen blocks served from the activation cache
                    logits = self.ddp(x)
                if per_sample:
                    losses = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing, reduction="none")
                    loss = losses.mean()
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
            if self._nonfinite(loss):
                if cfg.train.on_nonfinite == "stop":
                    raise NonFiniteLossError(self._nonfinite_message(loss, epoch, step))
                applied, skipped = False, True
            else:
                applied, skipped = self._backward_and_step(loss)
            step_losses = None if losses is None or not applied else losses.detach()
            # a step not applied (train.on_nonfinite=skip) leaves no statistic; its FLOPs are charged
            ctl.after_step(logits, y, idx, losses=step_losses, skipped=skipped)
            if not applied:
                nonfinite += 1
                if bar is not None:
                    bar.update(1)
                continue
            n = y.numel()
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            count += n
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if nonfinite and nonfinite == steps:
            raise NonFiniteLossError(f"every one of the {steps} steps of epoch {epoch} had a non-finite loss or "
                                     f"gradient (train.on_nonfinite=skip); {self._last_good()}; lower optim.lr")
        m = ctl.end_epoch()
        m["nonfinite_skipped"] = nonfinite
        dist_utils.sync_buffers(model)  # BN statistics: rank 0's, as evaluated and checkpointed
        loss_sum, correct, count = dist_utils.all_reduce_sum(loss_sum, correct, count)
        m["train_loss"] = float(loss_sum / max(count, 1))
        m["train_acc"] = float(correct) / max(count, 1)
        return m

    def _backward_and_step(self, loss: torch.Tensor) -> tuple[bool, bool | torch.Tensor]:
        """Backward pass and optimizer step: ``(applied, skipped)``. ``applied`` is False when the
        step was not taken (``skip`` mode and a NaN/inf gradient: a finite but huge loss can still
        overflow the backward pass); ``skipped`` is what the controller is told (under AMP, whether
        GradScaler skipped the step, as a 0-dim tensor: no host sync)."""
        opt, ctl = self.optimizer, self.ctl
        _clear_grads(opt)
        if self.scaler is not None:  # GradScaler skips the steps with inf/NaN gradients itself
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)  # before before_step: the statistics see unscaled gradients
            ctl.before_step()
            return True, amp_step(self.scaler, opt)
        loss.backward()
        if self.cfg.train.on_nonfinite == "skip" and not _finite_grads(self.model):
            _clear_grads(opt)
            return False, True
        ctl.before_step()
        opt.step()
        return True, False

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is NaN/inf on any rank (all ranks decide alike: one tiny all-reduce)."""
        return dist_utils.all_reduce_sum(~torch.isfinite(loss.detach()))[0] > 0

    def _last_good(self) -> str:
        last = self.out / "checkpoints" / "last.pt"
        return (f"the last good checkpoint {str(last)!r} is intact" if last.exists()
                else "no checkpoint was written yet")

    def _nonfinite_message(self, loss: torch.Tensor, epoch: int, step: int) -> str:
        return (f"the training loss is {float(loss.detach())} at epoch {epoch}, step {step} (both counted from 0; "
                f"train.on_nonfinite=stop); {self._last_good()}; lower optim.lr, or set "
                "train.on_nonfinite=skip to skip such steps")

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for x, y, _ in self.eval_loader:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = self.model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += y.numel()
        return correct / max(count, 1), loss_sum / max(count, 1)

    def _bar(self, total: int, desc: str):
        if self.quiet or not self.cfg.logging.progress or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def _log(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.logging.tensorboard and self.is_main and self.tensorboard is None:
            from spfde.report import TensorBoardLogger

            self.tensorboard = TensorBoardLogger(self.out / "tensorboard")
        last = cfg.train.epochs - 1
        if self.start_epoch <= last:
            self._log(f"threads {self.threads.threads} ({self.threads.reason})")
            self._log(f"epochs {self.start_epoch}..{last} (0-based, as in metrics.jsonl, the report and `spfde plan`)")
        for note in self.ctl.notes:
            self._log(f"note: {note}")
        self.ctl.cache.set_log(self._log)
        session_t0, session_start = time.perf_counter(), self.start_epoch
        for epoch in range(self.start_epoch, cfg.train.epochs):
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            m = self.train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            epoch_s = time.perf_counter() - t0
            self.wall_s += epoch_s
            test_acc = test_loss = None
            if self.is_main and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs):
                test_acc, test_loss = self.evaluate()
            row = {"epoch": epoch, "lr": self.ctl.current_lr(), "train_loss": m.pop("train_loss"),
                   "train_acc": m.pop("train_acc"), "test_acc": test_acc, "test_loss": test_loss,
                   "epoch_s": epoch_s, "wall_s": self.wall_s,
                   "peak_mem_bytes": (int(torch.cuda.max_memory_allocated(self.device))
                                      if self.device.type == "cuda" else None)}
            row.update(m)
            self.metrics.append(row)
            if self.world_size > 1:  # a collective: each rank's RNG goes into rank 0's checkpoint
                self._rng_by_rank = dist_utils.all_gather_objects(rng_states())
            if not self.is_main:  # rank 0 writes every output
                continue
            hist = row.pop("forgetting_histogram", None)
            if hist is not None:
                from spfde.analysis import save_forgetting_histogram

                save_forgetting_histogram(self.out, epoch, hist)
            if self.tensorboard is not None:
                self.tensorboard.log_epoch(row)
            if cfg.analysis.snapshots and (epoch % cfg.train.interval == 0 or epoch + 1 == cfg.train.epochs):
                from spfde.analysis import save_snapshot

                save_snapshot(self.out, epoch, self.model, self.ctl.sparsity.masks)
            # metrics first: a kill between the two re-runs this epoch from the previous checkpoint
            self._write_metrics()
            self.checkpoint(epoch)
            acc = "-" if test_acc is None else f"{100 * test_acc:.2f}%"
            # the whole run's pace, evaluation and checkpoints included
            eta = (time.perf_counter() - session_t0) / (epoch + 1 - session_start) * (last - epoch)
            self._log(f"epoch {epoch:3d}/{last}  loss {row['train_loss']:.4f}  "
                      f"train {100 * row['train_acc']:.2f}%  test {acc}  density {row['density']:.3f}"
                      f"{_density_note(cfg, epoch)}  frozen {len(row['frozen_blocks'])}  "
                      f"samples {row['samples_seen']}  {epoch_s:.1f}s  "
                      f"{row['samples_seen'] / max(epoch_s, 1e-9):.0f} samples/s  ETA {format_duration(eta)}")
        return self.finish()

    def _write_metrics(self) -> None:
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.metrics))

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        from spfde.accounting.flops import dense_train_flops, forward_flops_summary

        accs = [r["test_acc"] for r in self.metrics if r["test_acc"] is not None]
        dense = dense_train_flops(self.ctl.layer_flops, len(self.train_set), cfg.train.epochs)
        total = int(self.ctl.ledger.total_flops)
        mem = [r["mem_model_bytes"] for r in self.metrics if r.get("mem_model_bytes")]
        unfrozen = [r.get("mem_model_unfrozen_bytes") or r["mem_model_bytes"] for r in self.metrics
                    if r.get("mem_model_bytes")]
        peaks = [r["peak_mem_bytes"] for r in self.metrics if r.get("peak_mem_bytes")]
        summary = {
            "final_test_acc": accs[-1] if accs else None,
            "best_test_acc": max(accs) if accs else None,
            "epochs": cfg.train.epochs,
            "wall_s": self.wall_s,
            "seed": cfg.seed,
            "weights_sha256": state_dict_sha256(self.model.state_dict()),
            "train_flops": total,
            "dense_train_flops": int(dense),
            "flops_saving": 1.0 - total / dense if dense else 0.0,
            **forward_flops_summary(self.ctl.layer_flops, self.ctl.other_forward_flops),
            "method": cfg.sparsity.method if cfg.sparsity.target > 0 else "dense",
            "sparsity": cfg.sparsity.target,
            "freeze_target": cfg.freezing.target,
            "sieve_ratio": cfg.sieving.ratio if cfg.sieving.method != "none" else 0.0,
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "peak_mem_bytes": max(peaks) if peaks else None,
            "mem_model_avg_bytes": sum(mem) / len(mem) if mem else None,
            "mem_model_min_bytes": min(mem) if mem else None,
            # Fig. 4: SpFDE Avg./Min. against the same sparse run without freezing
            "mem_model_unfrozen_avg_bytes": sum(unfrozen) / len(unfrozen) if unfrozen else None,
            "mem_saving_avg": 1 - sum(mem) / sum(unfrozen) if mem else None,
            "mem_saving_min": 1 - min(mem) / min(unfrozen) if mem else None,
            # wall-clock first (docs/design.md): what a user waits for, beside what the ledger counts
            "threads": self.threads.threads,
            "train_size": len(self.train_set),
            "samples_per_s": (sum(r.get("samples_seen") or 0 for r in self.metrics) / self.wall_s
                              if self.wall_s > 0 else None),
            **time_to_acc_fields(self.metrics),
        }
        if self.ctl.plan is not None:
            # the freezing reduction against the same run replayed without freezing: total, and the
            # paper's definition (the frozen blocks' backward FLOPs only)
            without = self.ctl.planned_flops(with_freezing=False)["train_flops"]
            summary["freeze_reduction"] = 1.0 - total / without
            summary["freeze_backward_reduction"] = sum(r.get("bp_flops_saved", 0) for r in self.metrics) / without
        if self.is_main:
            self._write_metrics()
            atomic_write_json(self.out / "summary.json", summary)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary


def train(cfg: Config, out_dir: str | Path, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run a new training run into ``out_dir`` (refused if it is not empty, unless ``force``).

    Everything that can fail on bad input (model name, data files, the freezing plan) is checked by
    building the trainer before the folder is touched, so a failed start neither leaves a half-made
    run behind nor, with ``force``, deletes the run that was there. An interruption
    (KeyboardInterrupt, SIGTERM in the CLI) carries ``run_dir``: the folder to resume, or None when
    the run had not started (nothing to resume).
    """
    from spfde.models import resolve_model

    out = Path(out_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prepares the directory
    lock = RunLock(out, enabled=main)  # rank 0 writes every output: it alone holds the folder
    started = False
    try:
        if main:
            check_out_dir(out, force)
            if out.is_dir():
                lock.acquire()  # a folder another run is using (--force) is refused before any work
        with config_caused():  # a bad name, import path or kwargs fails before data loads
            resolve_model(cfg.model.name, cfg.model.kwargs)
        with memory_errors(at_start=True):
            trainer = Trainer(cfg, out, quiet=quiet)
        if main:
            prepare_out_dir(out, force)
            lock.acquire()  # a new folder: held from its start, before anything is written in it
            atomic_write_text(out / "config.yaml", dump_config(cfg))
        started = True
        with memory_errors(at_start=False):
            return trainer.run()
    except KeyboardInterrupt as e:
        e.run_dir = str(out) if started else None
        raise
    finally:
        lock.release()


def _check_world_size(ckpt: dict[str, Any], trainer: Trainer, allowed: bool, changes: list[str], out: Path) -> None:
    """The number of processes sets the global batch (``data.batch_size`` is per process): a resume
    with another count is a config change, refused unless ``--allow-config-change``."""
    old = ckpt.get("world_size")
    new = trainer.world_size
    if old is None or int(old) == new:  # checkpoints before the field: not known
        return
    if int(ckpt["epoch"]) + 1 >= trainer.cfg.train.epochs:  # finished: nothing left to train
        return
    bs = trainer.cfg.data.batch_size
    what = f"processes {old} -> {new} (global batch {int(old) * bs} -> {new * bs})"
    if not allowed:
        raise ConfigError(f"cannot resume {str(out)!r}: it was trained with {old} process(es) and this launch has "
                          f"{new}, which changes the global batch from {int(old) * bs} to {new * bs} "
                          f"(data.batch_size is per process); launch it with {old} (torchrun --nproc_per_node={old}"
                          f"{'' if int(old) > 1 else ', or plain spfde train'}), or pass --allow-config-change to "
                          "go on with the new global batch (not bit-identical to an uninterrupted run)")
    changes.append(what)


def resume(out_dir: str | Path, quiet: bool = False, allow_config_change: bool = False) -> dict[str, Any]:
    """Continue the run in ``out_dir`` from its newest intact checkpoint (or from scratch if it
    has none). The checkpoint is verified and its config compared with ``config.yaml`` before
    anything is built: a changed key that shapes the run is refused (a :class:`ConfigError`
    listing the changes); ``allow_config_change`` accepts the few safe ones
    (:data:`spfde.checkpoint.ALLOWED_WITH_FLAG`)."""
    out = Path(out_dir)
    cfg_path = out / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"cannot resume {str(out)!r}: no config.yaml there, so it is not a spfde run directory; "
                          "start a run with --config FILE --out DIR")
    # before anything is read: a second process resuming the same run would interleave its checkpoints
    with RunLock(out, enabled=int(os.environ.get("RANK", "0")) == 0):
        return _resume(out, cfg_path, quiet, allow_config_change)


def _resume(out: Path, cfg_path: Path, quiet: bool, allow_config_change: bool) -> dict[str, Any]:
    cfg = load_config(cfg_path)
    found = load_latest(out / "checkpoints")
    changes: list[str] = []
    if found is not None:
        old = found[1].get("config")
        if not isinstance(old, dict):
            raise SpfdeError(f"checkpoint {str(found[0])!r} does not hold the config it was trained with")
        changes = check_resume_config(old, cfg.to_dict(), allow_config_change, str(out))
    with memory_errors(at_start=True):
        trainer = Trainer(cfg, out, quiet=quiet)
    if found is not None:
        path, ckpt, rejected = found
        _check_world_size(ckpt, trainer, allow_config_change, changes, out)
        trainer.restore(ckpt, path)
        trainer.last_rejected = rejected
    if changes:
        trainer._log(f"resuming with config changes: {', '.join(changes)}")
    if trainer.is_main and (out / "checkpoints").is_dir():
        for stale in (out / "checkpoints").glob(".*.tmp"):  # temp files of a write that was killed
            os.unlink(stale)
    if trainer.start_epoch >= cfg.train.epochs:
        from spfde.report.runs import finished_summary

        summary = finished_summary(out)
        if summary is not None:
            return summary
        if (out / "summary.json").exists():  # damaged: run() writes it again from the checkpoint restored
            trainer._log(f"{str(out / 'summary.json')!r} is damaged; writing it again from the last checkpoint")
    with memory_errors(at_start=False):
        return trainer.run()
