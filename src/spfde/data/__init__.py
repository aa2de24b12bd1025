"""Data: datasets as tensors, a tensor-resident loader with vectorized augmentation, samplers.

Method card
-----------
What it does
    ``load_datasets(cfg.data, seed)`` gives ``(train, test, info)``; every item and every batch
    carries the sample's training-set index, which data sieving (paper Section 4.3) needs.
    ``make_train_loader`` / ``make_eval_loader`` build the fast :class:`TensorLoader`
    (``data.loader=tensor``: the dataset lives on the device, batches are gathered, augmented and
    normalized as whole tensors) or a wrapped ``torch.utils.data.DataLoader``
    (``data.loader=torch``: per-sample augmentation, worker processes, streaming ImageFolder).
Hyper-parameters
    Every ``data.*`` config key: ``name``, ``root``, ``subset``, ``test_subset``, ``batch_size``,
    ``eval_batch_size``, ``augment``, ``crop_padding``, ``flip``, ``pad_to_32``, ``channels``,
    ``image_size``, ``loader``, ``num_workers``, ``synthetic_size``, ``synthetic_classes``.
Expected effect
    Same samples, same labels, same augmentation distribution on both loaders; the tensor loader
    is several times faster on small images (see ``bench/loader.py``).

Usage::

    train, test, info = load_datasets(cfg.data, seed=cfg.seed)
    loader = make_train_loader(cfg.data, train, ctl.sampler, device, cfg.seed)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y, idx in loader:
            ...
"""

from spfde.data.augment import augment_batch, normalize, random_crop, random_flip
from spfde.data.datasets import (
    ArrayDataset,
    DatasetInfo,
    ImageFolderDataset,
    channel_stats,
    find_cifar_folder,
    find_fashion_mnist,
    load_cifar,
    load_datasets,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    make_synthetic,
    parse_idx,
    read_idx,
    stratified_subset,
)
from spfde.data.fetch import ensure_fashion_mnist
from spfde.data.loader import EpochShuffleSampler, TensorLoader, TorchLoader, make_eval_loader, make_train_loader

__all__ = [
    "ArrayDataset", "DatasetInfo", "EpochShuffleSampler", "ImageFolderDataset", "TensorLoader", "TorchLoader",
    "augment_batch", "channel_stats", "ensure_fashion_mnist", "find_cifar_folder", "find_fashion_mnist",
    "load_cifar", "load_datasets", "load_digits", "load_fashion_mnist", "load_image_folder", "make_eval_loader",
    "make_synthetic", "make_train_loader", "normalize", "parse_idx", "random_crop", "random_flip", "read_idx",
    "stratified_subset",
]
