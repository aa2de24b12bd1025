"""Integrations with training frameworks.

* :class:`spfde.integrations.lightning.SpFDECallback` -- PyTorch Lightning 2.x
  (``pip install 'spfde[lightning]'``).
* :mod:`spfde.integrations.hf` -- Hugging Face ``transformers`` models (``pip install 'spfde[hf]'``): what the
  controller does with them, and :func:`~spfde.integrations.hf.causal_lm_losses` for the loss criterion.

Importing this package does not import Lightning; ``from spfde.integrations import SpFDECallback``
does, lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SpFDECallback"]


def __getattr__(name: str) -> Any:
    if name == "SpFDECallback":
        from spfde.integrations.lightning import SpFDECallback

        return SpFDECallback
    raise AttributeError(f"module 'spfde.integrations' has no attribute {name!r}")
