"""Shared fixtures: small data sets made on the fly; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Under pytest-xdist (README: ``-n 2``) each of the two workers gets one core's worth of threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


class TensorImages(torch.utils.data.Dataset):
    """A minimal data set of the sample contract over an image tensor [N, C, H, W]."""

    def __init__(self, images: torch.Tensor, labels=None, masks=None):
        self.images = images
        self.labels = list(labels) if labels is not None else [0] * len(images)
        self.masks = masks if masks is not None else torch.zeros(images.shape[0], *images.shape[2:])
        self.has_masks = masks is not None
        self.category = "tensors"

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i], "label": self.labels[i],
                "path": f"img{i}.png", "defect_type": "good" if self.labels[i] == 0 else "defect"}


@pytest.fixture
def tensor_images():
    return TensorImages


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic set (both categories, 64x64 grayscale) shared by the tests."""
    from defectscope.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synth")
    return make_synthetic(root, image_size=64, channels=1, n_train=60, n_test_good=16, n_test_defect=4, seed=0,
                          progress=False)


@pytest.fixture
def one_thread():
    """One torch thread for the test (as each xdist worker has), restored after it: keeps short
    training runs reproducible and their floors stable when the file runs without xdist."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
