"""Build and load the optional native kernel library (``sparse_conv.cpp``: sparse Conv2d and Linear, short attention).

The library is plain C++ with ``extern "C"`` functions (no torch headers), compiled with the
machine's compiler and loaded with :mod:`ctypes`, which releases the GIL during each call.

* Built by ``make setup`` (``python -m spfde.sparsity.kernels.native``), otherwise lazily at the
  first sparse convolution or Linear call, into a cache folder: ``$SPFDE_KERNEL_CACHE``, else
  ``$XDG_CACHE_HOME/spfde/kernels``, else ``~/.cache/spfde/kernels``. The file name carries a
  hash of the source, the compiler (path and ``--version``), the flags and the CPU's feature
  flags, so a changed source, compiler or machine builds afresh and a shared home folder never
  loads a library built for another CPU.
* Compiler: ``$SPFDE_CXX``, else ``$CXX``, else ``g++``/``c++``/``clang++``; flags
  ``-O3 -march=native -fopenmp -shared -fPIC`` (without ``-fopenmp`` when the compiler lacks it)
  plus ``$SPFDE_CXXFLAGS`` (e.g. ``-mno-avx512f`` for the portable code path).
* A failed build is never fatal: it prints ONE warning line per process and every convolution
  runs PyTorch's dense kernel (``SPFDE_CXX=/nonexistent`` forces that path); sparse Linear layers
  then run their pure-PyTorch CSR path (no warning: still sparse, only slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from spfde.sparsity.kernels.common import warn_once

SOURCE = Path(__file__).with_name("sparse_conv.cpp")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17")
ABI_VERSION = 14

_lock = threading.Lock()
_state: dict[str, object] = {"lib": None, "tried": False, "error": None, "path": None, "warned": False}

_c_i64 = ctypes.c_int64
_c_int = ctypes.c_int
_ptr = ctypes.c_void_p
_SIGNATURES = {
    "spfde_conv2d_forward": [_ptr] + [_c_i64] * 15 + [_ptr] * 7 + [_c_i64] * 4 + [_c_int],
    "spfde_conv2d_backward": [_ptr] + [_c_i64] * 4 + [_ptr] + [_c_i64] * 4 + [_c_i64] * 15 + [_ptr] * 10
                             + [_ptr] + [_c_i64] * 4 + [_ptr, _c_int],
    "spfde_linear_forward": [_ptr] + [_c_i64] * 4 + [_ptr] * 5 + [_c_i64, _c_int, _ptr, _c_int, _ptr],
    "spfde_linear_backward": [_ptr, _c_i64, _ptr] + [_c_i64] * 4 + [_ptr] * 7 + [_c_i64, _ptr, _ptr, _c_int, _ptr,
                                                                                _c_int, _ptr, _ptr],
    "spfde_linear_packed_floats": [_c_i64, _c_i64],
    "spfde_mha_unit_floats": [_c_i64, _c_i64, _c_i64],
    "spfde_mha_forward": [_ptr] + [_c_i64] * 6 + [ctypes.c_float] + [_ptr] * 11 + [_c_i64, _c_i64, _c_int] + [_ptr] * 4
                         + [_c_int, _ptr, _ptr, ctypes.c_float, _ptr, _ptr, _c_int],
    "spfde_mha_backward": [_ptr] + [_c_i64] * 6 + [ctypes.c_float] + [_ptr] * 19 + [_c_i64, _c_i64, _ptr, _c_int, _ptr,
                                                                                  _ptr, _c_int, _ptr, _c_int]
                          + [_c_int, _ptr, _c_i64, _c_i64] + [_ptr] * 5 + [_c_int],
    "spfde_mlp_forward": [_ptr] + [_c_i64] * 5 + [_ptr] * 11 + [_c_i64, _c_int] + [_ptr] * 3
                         + [_c_int, _ptr, _ptr, ctypes.c_float, _ptr, _ptr, _c_int],
    "spfde_mlp_backward": [_ptr] + [_c_i64] * 5 + [_ptr] * 18 + [_c_i64, _ptr, _c_int, _ptr, _ptr, _c_int, _ptr,
                                                                   _c_int] + [_c_int, _ptr, _c_i64] + [_ptr] * 5
                          + [_c_int],
    "spfde_attention_forward": [_ptr] + [_c_i64] * 6 + [ctypes.c_float, _ptr, _c_i64, _c_i64, _ptr, _c_int],
    "spfde_attention_backward": [_ptr] + [_c_i64] * 6 + [ctypes.c_float, _ptr, _c_i64, _c_i64, _ptr, _ptr, _c_i64,
                                                         _c_i64, _c_int],
    "spfde_fingerprint": [_ptr] + [_c_i64] * 3 + [_ptr, _ptr, _c_int],
}


def cache_dir() -> Path:
    if os.environ.get("SPFDE_KERNEL_CACHE"):
        return Path(os.environ["SPFDE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spfde" / "kernels"


def compiler() -> str | None:
    """The compiler to use: ``$SPFDE_CXX``, ``$CXX``, or the first of g++/c++/clang++ on PATH."""
    for env in ("SPFDE_CXX", "CXX"):
        if os.environ.get(env):
            return os.environ[env]
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _flags() -> tuple[str, ...]:
    return FLAGS + tuple(shlex.split(os.environ.get("SPFDE_CXXFLAGS", "")))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _library_path(cxx: str) -> Path:
    try:
        version = _run([cxx, "--version"], timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), version.encode(), " ".join(_flags()).encode(),
                 _cpu_flags().encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"spfde_sparse_conv-{h.hexdigest()[:16]}.so"


def _compile(cxx: str, out: Path) -> str | None:
    """Compile into ``out`` (atomically, with OpenMP when the compiler has it); an error text or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    error = "no compiler run"
    for flags in (_flags() + ("-fopenmp",), _flags()):
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            r = _run([cxx, *flags, "-o", tmp, str(SOURCE)])
            if r.returncode == 0:
                os.replace(tmp, out)  # parallel builds (test workers, DDP ranks) race harmlessly
                return None
            lines = (r.stderr or r.stdout).strip().splitlines()
            errors = [ln.strip() for ln in lines if "error" in ln.lower()]
            error = (errors or lines or [f"{cxx} exited with code {r.returncode}"])[0]
        except (OSError, subprocess.SubprocessError) as e:
            return str(e) or type(e).__name__
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return error


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    if lib.spfde_abi_version() != ABI_VERSION:
        raise OSError(f"library ABI {lib.spfde_abi_version()} != {ABI_VERSION}")
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = _c_i64 if name.endswith("_floats") else ctypes.c_int
    return lib


def load(build: bool = True, quiet: bool = False) -> ctypes.CDLL | None:
    """The loaded library, building it first when needed; None (and one warning line) on failure."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _state["lib"], _state["error"] = _load(build)
        lib = _state["lib"]
        if lib is None and not quiet and not _state["warned"]:
            _state["warned"] = True
            warn_once(f"native sparse convolution kernel unavailable ({_state['error']}); convolutions run "
                      "PyTorch's dense kernels")
        return lib  # type: ignore[return-value]


def _load(build: bool) -> tuple[ctypes.CDLL | None, str | None]:
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler found; set SPFDE_CXX"
    try:
        path = _library_path(cxx)
        if not path.exists():
            error = _compile(cxx, path) if build else "not built yet"
            if error is not None:
                return None, error
        lib = _bind(ctypes.CDLL(str(path)))
        _state["path"] = str(path)
        return lib, None
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        return None, (str(e).splitlines() or [type(e).__name__])[0]


def status() -> dict[str, object]:
    """``{"available": bool, "path": str | None, "error": str | None}`` (loads the library once)."""
    lib = load(quiet=True)
    return {"available": lib is not None, "path": _state["path"], "error": _state["error"]}


def _reset_for_tests() -> None:
    """Forget the loaded library so the next :func:`load` builds/loads again (tests only)."""
    with _lock:
        _state.update(lib=None, tried=False, error=None, path=None, warned=False)


def main() -> int:
    """``python -m spfde.sparsity.kernels.native``: build now, print one status line, exit 0."""
    info = status()
    if info["available"]:
        print(f"spfde: native sparse convolution kernel ready ({info['path']})")
    else:
        print(f"spfde: native sparse convolution kernel not built ({info['error']}); "
              "dense convolutions will be used", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
