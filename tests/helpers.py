"""Small helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """stem -> body (conv, BN, ReLU, conv, ReLU) -> head: three kinds of prunable layer in forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def small_conv_net(seed: int = 0) -> SmallConvNet:
    torch.manual_seed(seed)
    return SmallConvNet()


def masked_sgd_steps(model: nn.Module, engine, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                     steps: int = 2) -> Iterator[None]:
    """Training steps with a sparse engine's two per-step calls around the optimizer; yields after each."""
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        engine.before_step()
        opt.step()
        engine.after_step(opt)
        yield


def controller_epochs(ctl, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                      batch: int, epochs: int) -> None:
    """The README's own-loop recipe: ``epochs`` epochs over ``x`` in order, batches of ``batch``."""
    for epoch in range(epochs):
        ctl.start_epoch(epoch)
        for i in range(0, len(x), batch):
            idx = torch.arange(i, min(i + batch, len(x)))
            out = model(x[idx])
            opt.zero_grad()
            nn.functional.cross_entropy(out, y[idx]).backward()
            ctl.before_step()
            opt.step()
            ctl.after_step(out, y[idx], idx)
        ctl.end_epoch()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` on 127.0.0.1 (CPU, one thread per rank), output captured."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_main(*argv: str) -> tuple[int, str, str]:
    """``spfde ARGV`` in this process: ``(exit code, stdout, stderr)``. An exception escaping
    ``spfde.cli.main`` (a traceback for the user) propagates and fails the test."""
    import contextlib
    import io

    from spfde.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]
