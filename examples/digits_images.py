"""Training from a map-style image Dataset with random augmentation, loaded on 2 worker processes per rank.

scikit-learn's digits (bundled, no download) as 1x8x8 images, a small CNN, and a random shift of up to one pixel
drawn from a generator seeded by (item index, epoch): the augmentation, and so the result, is the same whatever
the number of loader workers or of ranks. Runs unchanged as ``python examples/digits_images.py`` and as
``dfit-launch --nproc-per-node 2 examples/digits_images.py`` (each rank then loads only its rows of each
global batch).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset

import dfit


class DigitImages(Dataset):
    """Items ``(image (1, 8, 8) float32, label int64)``; with ``augment``, shifted by up to a pixel each way."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool, seed: int = 0):
        self.images, self.labels, self.augment, self.seed = images, labels, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """dfit calls this before each epoch's workers start: the shifts change from epoch to epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.augment:  # a generator of (seed, epoch, item): no dependence on which worker reads the item
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            dy, dx = rng.integers(-1, 2, size=2)
            image = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
        return torch.from_numpy(np.ascontiguousarray(image[None])), torch.tensor(self.labels[i])


def build_model(seed: int) -> dfit.Model:
    torch.manual_seed(seed)
    return dfit.Sequential([
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(), nn.Linear(128, 10),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--workers", type=int, default=2, help="loader processes per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", default="auto")
    parser.add_argument("--history-out", help="rank 0 writes the history here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(images))  # the file is grouped by writer: mix it once
    images, labels = images[order], labels[order]
    n_train = int(len(images) * 0.8)
    train = DigitImages(images[:n_train], labels[:n_train], augment=True, seed=args.seed)
    val = DigitImages(images[n_train:], labels[n_train:], augment=False)

    model = build_model(args.seed)
    model.compile(optimizer=torch.optim.Adam(model.module.parameters(), lr=3e-3),
                  loss=dfit.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    start = time.perf_counter()
    history = model.fit(train, validation_data=val, batch_size=args.batch_size, epochs=args.epochs,
                        seed=args.seed, workers=args.workers, verbose=verbose)
    elapsed = time.perf_counter() - start

    if dfit.distributed.is_chief():
        print(f"digits_images: {dfit.distributed.world_size()} process(es), {args.workers} loader worker(s) each, "
              f"val_accuracy={history.history['val_accuracy'][-1]:.4f}, fit time {elapsed:.1f} s")
        if args.history_out:
            with open(args.history_out, "w") as fh:
                json.dump({"history": history.history, "world_size": dfit.distributed.world_size()}, fh)


if __name__ == "__main__":
    main()
