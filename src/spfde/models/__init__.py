"""Model zoo: a timm-style registry of plain ``nn.Module`` definitions.

``create_model(name, num_classes, in_channels, width)`` builds a registered model;
``list_models()`` / ``model_info(name)`` back the ``spfde models`` command. Every model exposes
``blocks() -> list[str]``: its natural layer-freezing blocks (paper Section 4.2) as module names
in forward order, such that every parameter belongs to exactly one block.

``model.name`` may also be an import path ``package.module:callable`` (your own model; the
contract is in :mod:`spfde.models.registry`).

Registered: ``resnet20``, ``resnet32``, ``resnet56`` (CIFAR, He et al. 2016; SpFDE's ResNet-32 2x
is ``resnet32`` with ``width=2.0``), ``resnet50`` (ImageNet, bottleneck v1.5), ``vgg_small``,
``vit_tiny`` / ``vit_tiny_sdpa`` (a small ViT on ``nn.MultiheadAttention`` / ``scaled_dot_product_attention``).
"""

from __future__ import annotations

from spfde.models import cifar_resnet, resnet, vgg, vit  # noqa: F401  (imports register the models)
from spfde.models.cifar_resnet import BasicBlock, CifarResNet, shortcut_a
from spfde.models.common import BlockModel, init_weights, scale_channels
from spfde.models.registry import create_model, is_import_path, list_models, model_info, register_model, resolve_model
from spfde.models.resnet import Bottleneck, ResNet
from spfde.models.vgg import VGGSmall
from spfde.models.vit import VisionTransformer

__all__ = [
    "BasicBlock",
    "BlockModel",
    "Bottleneck",
    "CifarResNet",
    "ResNet",
    "VGGSmall",
    "VisionTransformer",
    "create_model",
    "init_weights",
    "is_import_path",
    "list_models",
    "model_info",
    "register_model",
    "resolve_model",
    "scale_channels",
    "shortcut_a",
]
