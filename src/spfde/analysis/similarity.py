"""Structural similarity (paper Section 3.1, Fig. 1a) and linear CKA (Section 3.2, Fig. 1b, Fig. A1).

Method card: structural similarity
    What: per layer, how much of an intermediate sparse model's most significant structure
        survives into the final sparse model. With ``nz(W)`` the nonzero positions of ``W`` and
        ``Top50(W_t)`` the ``k = ceil(0.5 * |nz(W_t)|)`` positions of largest ``|w|`` among
        ``nz(W_t)``::

            S(W_t, M_final) = |Top50(W_t) ∩ supp(M_final)| / |Top50(W_t)|

        ``supp(M_final)`` is the final mask (or the nonzeros of the final weights).
    Paper: Section 3.1: "we check the structural similarity by choosing the locations of the 50%
        most significant non-zero weights from the intermediate models", because DST algorithms
        rotate the least important weights even after the structure has stabilised.
    Hyper-parameters: ``top_fraction`` (0.5 in the paper).
    Expected effect: front layers reach ~100% early (about epoch 40 of 160 for ResNet-32 on
        CIFAR-100), later layers converge later; this motivates progressive freezing.

Method card: linear CKA
    What: centred kernel alignment with linear kernels (Kornblith et al. 2019) between a layer's
        outputs on a fixed probe batch under an intermediate and under the final model::

            CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

        with ``Xc``, ``Yc`` column-centred ``n x p`` / ``n x q`` features (a layer output is
        flattened per sample). Invariant to orthogonal maps and isotropic scaling, not to general
        invertible linear maps.
    Paper: Section 3.2 and Appendix A: sparsity does not slow the representation learning of a
        layer, so freezing can start as early as for dense training.
    Hyper-parameters: the probe batch (``analysis.probe_size`` samples of the test set) and the
        layers tracked.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from spfde.errors import SpfdeError

# --------------------------------------------------------------------------------------------
# structural similarity


def top_fraction_positions(w: torch.Tensor, fraction: float = 0.5, support: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Boolean mask (shape of ``w``) of the ``ceil(fraction * nnz)`` largest ``|w|`` among ``w``'s nonzeros.

    ``support`` (bool, optional) further restricts the candidates (e.g. the intermediate mask).
    Ties are broken deterministically by flattened index: at equal magnitude the lower index wins
    (a stable descending sort), so the answer never depends on the hardware.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = w.detach().reshape(-1)
    cand = flat != 0
    if support is not None:
        cand &= support.detach().reshape(-1).to(torch.bool).to(cand.device)
    idx = cand.nonzero().squeeze(1)
    out = torch.zeros_like(cand)
    k = math.ceil(fraction * idx.numel())
    if k:
        mags = flat[idx].abs().to(torch.float64)
        order = torch.sort(mags, descending=True, stable=True).indices[:k]
        out[idx[order]] = True
    return out.reshape(w.shape)


def structural_similarity(w_t: torch.Tensor, w_final_or_mask: torch.Tensor, fraction: float = 0.5,
                          mask_t: torch.Tensor | None = None) -> float:
    """Structural similarity S in [0, 1] of one layer (paper Section 3.1, Fig. 1a).

    ``S = |Top50(W_t) ∩ supp(M_final)| / |Top50(W_t)|`` where ``Top50(W_t)`` holds the
    ``ceil(fraction * nnz(W_t))`` positions of largest ``|w|`` among the nonzeros of ``w_t``
    (restricted to ``mask_t`` when given; ties: lower flattened index first) and
    ``supp(M_final)`` is ``w_final_or_mask`` itself if it is a bool tensor, else its nonzeros.

    All-dense case: if ``w_t`` has no zeros, Top50 is the top half of all weights; if the final
    layer is dense, S = 1. If ``w_t`` has no nonzero weight at all, S is undefined: ``nan``.
    """
    if w_t.shape != w_final_or_mask.shape:
        raise SpfdeError(f"structural_similarity: shapes differ, {tuple(w_t.shape)} vs {tuple(w_final_or_mask.shape)}")
    top = top_fraction_positions(w_t, fraction, mask_t)
    n = int(top.sum())
    if n == 0:
        return float("nan")
    final = w_final_or_mask.detach()
    supp = final.to(torch.bool) if final.dtype == torch.bool else final != 0
    return int((top & supp.to(top.device)).sum()) / n


def _layer_params(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> list[str]:
    # the layers the paper tracks are the sparse ones; a dense run has no masks, so fall back to
    # every conv / linear weight (dim >= 2)
    if masks:
        return [k for k in state if k in masks]
    return [k for k, v in state.items() if k.endswith("weight") and torch.is_tensor(v) and v.dim() >= 2]


def _split_snapshot(s: Any) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]:
    """A snapshot payload, a bare state_dict or a live module -> (state_dict, masks)."""
    if isinstance(s, nn.Module):
        return s.state_dict(), {}
    if isinstance(s, Mapping) and "model" in s and isinstance(s["model"], Mapping):
        return s["model"], s.get("masks") or {}
    if isinstance(s, Mapping):
        return s, {}
    raise SpfdeError(f"expected a snapshot dict, a state_dict or a model, got {type(s)!r}")


def _module_name(param_name: str) -> str:
    # the unit names of layer_density: a module for a weight, the parameter itself otherwise
    # (q/k/v_proj_weight of one attention module stay three layers)
    from spfde.sparsity.masks import unit_name

    return unit_name(param_name) or param_name


def structural_similarity_over_time(snapshots: Iterable[tuple[int, Any]], final: Any, fraction: float = 0.5
                                    ) -> dict[str, list[tuple[int, float]]]:
    """``{layer (module name): [(epoch, S)]}`` for every snapshot against the ``final`` model.

    ``snapshots`` is ``load_snapshots(run_dir)`` (or ``[(epoch, state_dict)]``); ``final`` is a
    snapshot payload (its masks define ``supp(M_final)``), a state_dict or a model (its nonzeros).
    Layers are the masked parameters of ``final`` (every conv/linear weight for a dense run).
    """
    f_state, f_masks = _split_snapshot(final)
    names = _layer_params(f_state, f_masks)
    out: dict[str, list[tuple[int, float]]] = {_module_name(n): [] for n in names}
    for epoch, snap in snapshots:
        state, masks = _split_snapshot(snap)
        for n in names:
            if n not in state:
                raise SpfdeError(f"snapshot of epoch {epoch} has no parameter {n!r}; is it from the same model?")
            ref = f_masks[n] if n in f_masks else f_state[n]
            out[_module_name(n)].append((int(epoch), structural_similarity(state[n], ref, fraction, masks.get(n))))
    return out


# --------------------------------------------------------------------------------------------
# linear CKA


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features ``x`` (n x p) and ``y`` (n x q), in [0, 1] (Kornblith et al. 2019).

    Extra dimensions are flattened per sample. Computed in float64 on centred features; uses the
    n x n Gram form when the features are wider than the batch (cheaper, same value). Returns
    ``nan`` when either side has zero variance (CKA is undefined there).
    """
    if x.shape[0] != y.shape[0]:
        raise SpfdeError(f"linear_cka: both feature sets need the same number of samples, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    n = x.shape[0]
    x = x.detach().reshape(n, -1).to(torch.float64)
    y = y.detach().reshape(n, -1).to(device=x.device, dtype=torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    # rescaling each side by its Frobenius norm changes nothing mathematically but keeps the
    # squared products far from overflow/underflow for very large or tiny activations
    nx, ny = torch.linalg.norm(x), torch.linalg.norm(y)
    if nx == 0 or ny == 0:
        return float("nan")
    x, y = x / nx, y / ny
    if max(x.shape[1], y.shape[1]) > n:  # a p x p product would dwarf the n x n Grams
        kx, ky = x @ x.T, y @ y.T
        hsic = (kx * ky).sum()
        den = torch.linalg.norm(kx) * torch.linalg.norm(ky)
    else:
        hsic = torch.linalg.norm(y.T @ x) ** 2
        den = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    return float((hsic / den).clamp(0.0, 1.0))


@torch.no_grad()
def capture_features(model: nn.Module, probe: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named modules on ``probe`` (eval mode, no grad), flattened to ``n x features``.

    Uses forward hooks, removed afterwards; the model's train/eval mode is restored.
    """
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise SpfdeError(f"no module named {missing[0]!r} in the model; pick layers from its named_modules()")
    feats: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            feats[name] = t.detach().reshape(t.shape[0], -1).to(torch.float64).cpu()
        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(probe)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return feats


def default_cka_layers(model: nn.Module) -> list[str]:
    """Every conv and linear module, in ``named_modules`` order (the paper's "1st ... 32nd layer")."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def layer_cka_over_time(model_factory_or_model: nn.Module | Callable[[], nn.Module],
                        snapshots: Iterable[tuple[int, Any]], final_state: Any, probe_batch: torch.Tensor,
                        layers: Sequence[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    """``{layer: [(epoch, CKA(layer output at epoch, layer output of the final model))]}`` (Fig. 1b).

    ``model_factory_or_model`` is a model (copied, never modified) or a zero-argument factory
    building the architecture; each snapshot's and ``final_state``'s weights are loaded into it
    (strictly) and the listed ``layers`` (default: every conv/linear) are captured on the fixed
    ``probe_batch`` in eval mode.
    """
    if isinstance(model_factory_or_model, nn.Module):
        model = copy.deepcopy(model_factory_or_model)
    else:
        model = model_factory_or_model()
    device = next(iter(model.parameters()), torch.empty(0)).device
    probe = probe_batch.to(device)
    layers = list(layers) if layers is not None else default_cka_layers(model)
    f_state, _ = _split_snapshot(final_state)
    model.load_state_dict(f_state)
    ref = capture_features(model, probe, layers)
    out: dict[str, list[tuple[int, float]]] = {n: [] for n in layers}
    for epoch, snap in snapshots:
        state, _ = _split_snapshot(snap)
        model.load_state_dict(state)
        feats = capture_features(model, probe, layers)
        for n in layers:
            out[n].append((int(epoch), linear_cka(feats[n], ref[n])))
    return out
