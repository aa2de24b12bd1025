"""Tensor-resident loader vs torch DataLoader: one augmented pass over the same data.

Both loaders do the same work per image (zero-pad 4 + random 32x32 crop + horizontal flip +
normalization) on Fashion-MNIST padded to 32x32x3 (synthetic data of that shape when
Fashion-MNIST is not installed); the TensorLoader does it on whole batches, the DataLoader per
sample in ``__getitem__``.

    python bench/loader.py            # a table
    python bench/loader.py --json     # one JSON object with "speedup"
    python bench/loader.py --quick    # 5k samples
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from spfde.config import DataConfig
from spfde.data import TensorLoader, TorchLoader, load_datasets
from spfde.errors import SpfdeError


def load(n: int, seed: int) -> tuple[object, str]:
    try:
        train, _, _ = load_datasets(DataConfig(name="fashion_mnist", pad_to_32=True, channels=3, subset=n), seed)
        return train, "fashion_mnist"
    except SpfdeError:
        train, _, _ = load_datasets(DataConfig(name="synthetic", synthetic_size=n, image_size=32, channels=3), seed)
        return train, "synthetic"


def one_pass(loader, device: torch.device) -> tuple[float, int]:
    loader.set_epoch(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    checksum = torch.zeros((), device=device)
    for x, _, _ in loader:
        checksum += x[:, 0, 0, 0].sum()  # touch every batch so nothing is skipped
        n += x.shape[0]
    float(checksum)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (the tensor loader's device)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader num_workers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: per-sample ops are single-threaded anyway, and on a "
                        "shared machine intra-op threads waiting on each other dominate the timing)")
    p.add_argument("--quick", action="store_true", help="5k samples")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    n = 5000 if args.quick else args.samples
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    train, source = load(n, 0)
    tensor = TensorLoader(train, args.batch_size, shuffle=True, augment=True, padding=4, flip=True, device=device)
    per_sample = TorchLoader(train.with_options(augment=True, padding=4, flip=True), args.batch_size, shuffle=True,
                             device=device, num_workers=args.workers)
    next(iter(tensor))  # first-touch costs (device copy, kernels) are not the steady state
    t_tensor, n_tensor = one_pass(tensor, device)
    t_torch, n_torch = one_pass(per_sample, device)
    ips_tensor, ips_torch = n_tensor / t_tensor, n_torch / t_torch
    result = {
        "speedup": ips_tensor / ips_torch,
        "tensor_images_per_s": ips_tensor,
        "dataloader_images_per_s": ips_torch,
        "tensor_s": t_tensor,
        "dataloader_s": t_torch,
        "samples": n,
        "batch_size": args.batch_size,
        "dataset": source,
        "device": str(device),
        "workers": args.workers,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{n} {source} images (3x32x32), batch {args.batch_size}, crop(4)+flip, device {device}, "
          f"{result['threads']} thread(s)")
    print(f"{'loader':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'TensorLoader (batched)':<28}{t_tensor:>10.3f}{ips_tensor:>12.0f}")
    print(f"{f'DataLoader ({args.workers} workers)':<28}{t_torch:>10.3f}{ips_torch:>12.0f}")
    print(f"speedup: {result['speedup']:.1f}x")


if __name__ == "__main__":
    main()
