"""The ``spfde`` command line.

Every user error (config, file, model) is printed as one ``error: ...`` line on stderr with a
non-zero exit code; tracebacks are for bugs only. Exit codes (docs/design.md, "Exit codes"): 0 done,
1 a user error that is not the config's (a file, the disk, a checkpoint), 2 a config or usage
error, 3 a non-finite training loss, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spfde.errors import ConfigError, SpfdeError, first_line

DEMO_PRESET = "fmnist-demo"
FORCE_HELP = "overwrite the run in --out (only a spfde run folder, never the current folder)"


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="FILE",
                   help="YAML config file or preset name (configs/*.yaml, e.g. fmnist-demo)")
    _add_set_arg(p)


def _add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. --set optim.lr=0.1 (repeatable; keys: docs/config.md)")


def _version() -> str:
    from spfde import __version__

    return f"spfde {__version__}"


def _build_parser() -> argparse.ArgumentParser:
    from spfde.report.cli import COMPARE_HELP, REPORT_HELP, add_compare_arguments, add_report_arguments
    from spfde.reproduce import TABLE_HELP

    parser = argparse.ArgumentParser(prog="spfde", description="Sparse training with layer freezing and data sieving.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a config")
    _add_config_args(p, required=False)
    p.add_argument("--out", "-o", help="run directory (config.yaml, metrics.jsonl, summary.json, checkpoints/)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept the safe edits of DIR/config.yaml (more epochs where the schedule "
                        "allows it, train.device, data.test_subset, analysis.snapshots, train.on_nonfinite); see "
                        "docs/design.md")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or per-epoch lines")

    p = sub.add_parser("demo", help="a short SpFDE run on Fashion-MNIST, then a report",
                       description=f"Train the {DEMO_PRESET} preset (configs/{DEMO_PRESET}.yaml), then write a report.")
    p.add_argument("--out", "-o", default="runs/demo", metavar="DIR", help="run directory (default: runs/demo)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or per-epoch lines")
    _add_set_arg(p)

    sub.add_parser("models", help="list the model registry")

    p = sub.add_parser("data", help="make sure a dataset is present and reads (Fashion-MNIST: apt or download)")
    p.add_argument("name", choices=["fashion_mnist"], help="the dataset")
    p.add_argument("--root", default=None, metavar="DIR", help="folder to look in / download to")

    p = sub.add_parser("flops", help="planned training FLOPs of a config, without training")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the exact numbers as JSON")

    p = sub.add_parser("plan", help="the layer-freezing plan (Algorithm 1) of a config, without training")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    add_report_arguments(sub.add_parser("report", help=REPORT_HELP, description=REPORT_HELP))
    add_compare_arguments(sub.add_parser("compare", help=COMPARE_HELP, description=COMPARE_HELP))

    width = max(len(n) for n in TABLE_HELP)
    p = sub.add_parser(
        "reproduce", help="run the grid behind a paper table and write our numbers beside it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the runs behind one of the paper's tables (finished runs are skipped, half-done\n"
                    "ones resumed), then write OUT/TABLE-PRESET/table.md beside the paper's numbers.",
        epilog="tables:\n" + "\n".join(f"  {n:<{width}}  {h}" for n, h in TABLE_HELP.items()))
    p.add_argument("name", metavar="TABLE", help="the table (listed below)")
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu",
                   help="cpu: Fashion-MNIST at CPU scale (default); paper: CIFAR-100 ResNet-32 2x, 160 epochs")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once; they share the cores (default 1)")
    p.add_argument("--out", default="runs/reproduce", metavar="DIR", help="runs and tables go here (default: "
                   "runs/reproduce)")
    p.add_argument("--dry-run", action="store_true", help="list the runs without training")
    p.add_argument("--only", metavar="REGEX", help="train only the rows whose id matches (see --dry-run)")
    _add_set_arg(p)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from spfde.distributed import cleanup

    try:
        code = _train(args)
    except BaseException:
        cleanup(sync=False)  # a peer may be gone: do not wait for it at a barrier
        raise
    cleanup()  # under torchrun: leave the process group cleanly (a no-op otherwise)
    return code


def _train(args: argparse.Namespace) -> int:
    from spfde.config import load_config

    if args.resume:
        from spfde.train import resume

        if args.config or args.overrides:
            raise ConfigError("--resume takes the run's own config.yaml; drop --config/--set")
        summary = resume(args.resume, quiet=args.quiet, allow_config_change=args.allow_config_change)
        out = args.resume
    else:
        if args.allow_config_change:
            raise ConfigError("--allow-config-change goes with --resume DIR")
        if not args.config or not args.out:
            raise ConfigError("spfde train needs --config FILE and --out DIR (or --resume DIR)")
        cfg = load_config(args.config, args.overrides)
        from spfde.train import train

        summary = train(cfg, args.out, force=args.force, quiet=args.quiet)
        out = args.out
    _print_summary(summary, out)
    return 0


def _print_summary(summary: dict[str, Any], out: str | Path) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return
    from spfde.units import format_duration, format_flops

    acc = summary.get("final_test_acc")
    print(f"final test accuracy {100 * acc:.2f}%" if acc is not None else "no evaluation")
    wall = f"wall-clock {summary['wall_s']:.1f}s" + (f" ({format_duration(summary['wall_s'])})"
                                                     if summary["wall_s"] >= 60 else "")
    if summary.get("samples_per_s"):
        wall += f" at {summary['samples_per_s']:.0f} samples/s"
    if summary.get("dense_train_flops") and summary.get("flops_saving"):
        print(f"training FLOPs {format_flops(summary['train_flops'])}, {100 * summary['flops_saving']:.1f}% below "
              "dense (the ledger's count)")
        # the ledger counts masked weights as saved; how much wall-clock that buys depends on the
        # kernels the masked layers ran (sparsity.kernels, docs/kernels.md), so only a dense run tells
        wall += ("; no dense run measured, so no wall-clock saving to show: train one and "
                 "`spfde compare` the two")
    print(wall)
    print(f"summary: {Path(out) / 'summary.json'}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from spfde.config import load_config
    from spfde.train import train

    cfg = load_config(DEMO_PRESET, args.overrides)
    summary = train(cfg, args.out, force=args.force, quiet=args.quiet)
    _print_summary(summary, args.out)
    from spfde.report import write_report

    path = write_report([Path(args.out)])
    print(f"report: {path}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from spfde.models import list_models, model_info

    rows = [(n, model_info(n)) for n in list_models()]
    width = max(len(n) for n, _ in rows)
    for name, info in rows:
        print(f"{name:<{width}}  {info.get('description', '')}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from spfde.data import ensure_fashion_mnist

    path = ensure_fashion_mnist(args.root)
    print(f"fashion_mnist: {path}")
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from spfde.config import load_config
    from spfde.planning import planned_run
    from spfde.units import format_flops

    cfg = load_config(args.config, args.overrides)
    result = planned_run(cfg)["flops"]
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            continue
        if key.endswith("flops") or key.endswith("flops_per_sample"):
            print(f"{key:<34} {format_flops(value):>14}  ({float(value):.3e})")
        elif key == "flops_saving":
            print(f"{key:<34} {100 * value:>13.2f}%")
        else:
            print(f"{key:<34} {value:>14}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from spfde.config import load_config
    from spfde.planning import planned_run

    cfg = load_config(args.config, args.overrides)
    plan = planned_run(cfg)["plan"]
    if plan is None:
        raise ConfigError("freezing.target is 0, so there is no freezing plan; set e.g. --set freezing.target=0.2")
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(f"tfrz {plan['tfrz']}, predicted training-FLOPs reduction {100 * plan['predicted_reduction']:.2f}%")
        if "weight_forward_flops_per_sample" in plan:
            print(f"forward FLOPs per sample: weights {plan['weight_forward_flops_per_sample']:.4e}, attention "
                  f"{plan['attention_forward_flops_per_sample']:.4e}, other (not charged) "
                  f"{plan['other_forward_flops_per_sample']:.4e}")
        if plan.get("planner"):
            print(f"  planner {plan['planner']}: target {100 * plan['target']:.2f}%, Algorithm 1's arithmetic "
                  f"{100 * plan['algorithm1_reduction']:.2f}%, exact ledger {100 * plan['predicted_reduction']:.2f}% "
                  f"total, {100 * plan['backward_reduction']:.2f}% backward of frozen blocks (the paper's definition)")
        for b in plan["blocks"]:
            print(f"  {b['name']:<24} freezes at epoch {b['freeze_epoch']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from spfde.report.cli import run_report

    return run_report(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from spfde.report.cli import run_compare

    return run_compare(args)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from spfde.reproduce import reproduce

    path = reproduce(args.name, preset=args.preset, seeds=args.seeds, jobs=args.jobs, out=Path(args.out),
                     dry_run=args.dry_run, overrides=args.overrides, only=args.only)
    if path is not None:
        print(f"table: {path}")
    return 0


COMMANDS = {
    "train": _cmd_train, "demo": _cmd_demo, "models": _cmd_models, "data": _cmd_data,
    "flops": _cmd_flops, "plan": _cmd_plan, "report": _cmd_report, "compare": _cmd_compare,
    "reproduce": _cmd_reproduce,
}


def main(argv: list[str] | None = None) -> int:
    if "torch" not in sys.modules:
        # Before torch loads OpenMP: idle threads sleep instead of spinning, so a run on cores that
        # other processes keep busy does not collapse (spfde.utils.choose_threads, README "Threads").
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    code = _main(argv)
    # A process that trained under torchrun ends here, skipping interpreter teardown (see
    # spfde.distributed.exit_process); looked up, not imported, so `spfde --help` stays torch-free.
    sd = sys.modules.get("spfde.distributed")
    return code if sd is None else sd.exit_process(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the process is, like Ctrl-C's KeyboardInterrupt (exit 143)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM handled like SIGINT: the epoch in progress is discarded (checkpoints are written
    atomically), one line says how to go on, and the exit code is 143."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(args: argparse.Namespace, e: KeyboardInterrupt) -> str:
    what = "terminated" if isinstance(e, Terminated) else "interrupted"
    if args.command == "reproduce":
        return f"{what}; run the same command again: finished runs are skipped and half-done ones resumed"
    if args.command not in ("train", "demo"):
        return what
    run = getattr(args, "resume", None) or getattr(e, "run_dir", None)
    if run is None:
        return f"{what} before the run started; nothing was trained, nothing to resume"
    return f"{what}; resume with `spfde train --resume {run}`"


def _main(argv: list[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        with _sigterm_as_interrupt():
            return COMMANDS[args.command](args)
    except SpfdeError as e:
        # one line, whatever the message holds; a config error is the same on every rank: rank 0 says it
        _say(f"error: {' '.join(str(e).split())}", every_rank=not isinstance(e, ConfigError))
        return e.exit_code
    except BrokenPipeError:  # `spfde ... | head`: the reader left; nothing more to say
        sys.stderr.close()
        return 0
    except OSError as e:  # a path we cannot read or write: say which, no traceback
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        _say(f"error: {e.strerror or e}{where}")
        return 1
    except MemoryError:
        _say("error: out of memory; lower data.batch_size, model.width or data.image_size")
        return 1
    except KeyboardInterrupt as e:
        # torchrun signals every rank alike (and the other ranks when one fails): rank 0 speaks for them
        _say(_interrupted(args, e), every_rank=False)
        return 143 if isinstance(e, Terminated) else 130
    except RuntimeError as e:
        if not _lost_peer(e):
            raise
        run = getattr(args, "resume", None) or getattr(args, "out", None)
        again = f"; resume with `spfde train --resume {run}`" if run and args.command in ("train", "demo") else ""
        _say(f"error: lost contact with the job's other processes ({first_line(e)[:200]}){again}")
        return 1


def _rank() -> int:
    """This process's rank under torchrun (0 outside it), read from the environment, so it holds
    before and after the process group exists."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _say(message: str, every_rank: bool = True) -> None:
    """A closing line on stderr: rank 0's as it is, another rank's prefixed with its rank, or not at
    all when every rank would say the same (``every_rank=False``)."""
    rank = _rank()
    if rank == 0:
        print(message, file=sys.stderr)
    elif every_rank:
        print(f"rank {rank}: {message}", file=sys.stderr)


def _lost_peer(e: RuntimeError) -> bool:
    """A collective failed because another process of the job died or left (gloo/NCCL transport)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not under torchrun
        return False
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(e, getattr(dist, "DistError", ())):
        return True
    return any(k in str(e) for k in ("gloo", "NCCL", "Connection reset", "Connection closed"))


if __name__ == "__main__":
    sys.exit(main())
