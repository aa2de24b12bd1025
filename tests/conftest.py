"""Suite-wide fixtures."""

from __future__ import annotations

import os

# The suite asserts CPU semantics (bit-identical runs, the CPU sparse kernels' choices, thread
# counts), so on a machine with a GPU it hides the GPUs before anything initialises CUDA:
# `train.device: auto` then means the CPU there too, as in CI. SPFDE_TEST_CUDA=1 keeps them, for
# the tests marked `cuda` (`SPFDE_TEST_CUDA=1 pytest -m cuda`; bench/gpu_session.sh runs them).
if os.environ.get("SPFDE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402

from spfde.sparsity.kernels import native  # noqa: E402

# where the native kernel libraries already are (read only: linked into each test's own folder)
_BUILT = native.cache_dir()


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test (and every process it starts) gets its own ``$SPFDE_KERNEL_CACHE``: ``auto``'s
    calibration file there starts empty, so tests stay independent and the suite never writes a
    calibration into the user's home. The libraries built before are linked in, so no test
    process compiles the native kernel again."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    for lib in sorted(_BUILT.glob("*.so")) if _BUILT.is_dir() else []:
        (cache / lib.name).symlink_to(lib)
    monkeypatch.setenv("SPFDE_KERNEL_CACHE", str(cache))
