"""spfde: sparse training with progressive layer freezing and circular data sieving.

Reference implementation of "Layer Freezing & Data Sieving: Missing Pieces of a Generic
Framework for Sparse Training" (NeurIPS 2022).
"""

__version__ = "0.1.0"

__all__ = ["SpFDE", "Config", "load_config", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import spfde.config` (the CLI's first step) does not pull in every subpackage.
    if name == "SpFDE":
        from spfde.controller import SpFDE

        return SpFDE
    if name in ("Config", "load_config"):
        from spfde import config

        return getattr(config, name)
    raise AttributeError(f"module 'spfde' has no attribute {name!r}")
