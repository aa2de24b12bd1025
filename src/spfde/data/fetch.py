"""Getting Fashion-MNIST onto the machine: an existing folder, the Debian package, or a download.

Method card
-----------
What it does
    ``ensure_fashion_mnist`` returns a folder holding the four idx ``.gz`` files of
    Fashion-MNIST (the paper's small benchmark, Section 5). Order: a folder that already has them
    (``root``, ``$SPFDE_DATA/fashion-mnist``, ``~/.cache/spfde/fashion-mnist``,
    ``/usr/share/datasets/fashion-mnist``); as root with apt, the ``dataset-fashion-mnist``
    package; otherwise a download from the public mirror, each file parsed before it is renamed
    into place, so an interrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

from spfde.data.datasets import (
    FASHION_MNIST_APT,
    FASHION_MNIST_FILES,
    FASHION_MNIST_SYSTEM_DIR,
    find_fashion_mnist,
    load_fashion_mnist,
    parse_idx,
)
from spfde.errors import SpfdeError
from spfde.utils import atomic_write_bytes

MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# expected leading dimension of each file, to reject a truncated or wrong download
_EXPECTED_N = {"train_images": 60000, "train_labels": 60000, "test_images": 10000, "test_labels": 10000}


def default_download_dir() -> Path:
    if os.environ.get("SPFDE_DATA"):
        return Path(os.environ["SPFDE_DATA"]) / "fashion-mnist"
    return Path.home() / ".cache" / "spfde" / "fashion-mnist"


def _try_apt() -> Path | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], check=False, capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", FASHION_MNIST_APT], check=True, capture_output=True,
                       env=env, timeout=1200)
    except (subprocess.SubprocessError, OSError):
        return None
    return find_fashion_mnist(None) if (FASHION_MNIST_SYSTEM_DIR / FASHION_MNIST_FILES["test_labels"]).is_file() \
        else None


def _download(dest: Path, timeout: float = 60.0) -> Path:
    import gzip

    errors = []
    for key, fname in FASHION_MNIST_FILES.items():
        if (dest / fname).is_file():
            continue
        for base in MIRRORS:
            try:
                with urllib.request.urlopen(base + fname, timeout=timeout) as r:
                    data = r.read()
                arr = parse_idx(gzip.decompress(data), base + fname)
                if arr.shape[0] != _EXPECTED_N[key]:
                    raise SpfdeError(f"{base + fname} holds {arr.shape[0]} items, expected {_EXPECTED_N[key]}")
            except Exception as e:  # noqa: BLE001 - any failure of one mirror: try the next
                errors.append(f"{base + fname}: {e}")
                continue
            atomic_write_bytes(dest / fname, data, elsewhere="point `spfde data --root` or data.root at another disk")
            break
        else:
            raise SpfdeError(f"could not download Fashion-MNIST file {fname} ({'; '.join(errors[-2:])}); "
                             f"install the Debian package {FASHION_MNIST_APT} or copy the files into {dest}")
    return dest


def ensure_fashion_mnist(root: str | None = None, allow_apt: bool = True, allow_download: bool = True) -> Path:
    """A folder with the four Fashion-MNIST idx ``.gz`` files, fetching them if needed. The files are
    read the way a run reads them (:func:`~spfde.data.datasets.load_fashion_mnist`) before the folder
    is returned: a folder whose files are all there but one is truncated or damaged (an interrupted
    copy) is an error naming that file, not a "present" that the first run then refutes."""
    found = find_fashion_mnist(root)
    if found is None and allow_apt and root is None:  # the Debian package installs into its own folder
        found = _try_apt()
    if found is None and allow_download:
        found = _download(Path(root) if root is not None else default_download_dir())
    if found is not None:
        load_fashion_mnist(found)
        return found
    raise SpfdeError(
        f"Fashion-MNIST not found; install the Debian package {FASHION_MNIST_APT} "
        f"(files in {FASHION_MNIST_SYSTEM_DIR}), or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        f"{MIRRORS[0]} into $SPFDE_DATA/fashion-mnist (or pass root)")
