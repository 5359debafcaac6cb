"""End to end: the two autoencoders of the guide learn the synthetic set.

Floors: on the synthetic set at 64x64 (60 training images, 24 normal and 24 defective test images
per category) a few epochs must already beat chance by a clear margin. Measured when the floors
were set: SAE (20 epochs) 0.67-0.73 image AUROC and 0.71-0.79 pixel AUROC, DAE (8 epochs)
0.60-0.69 and 0.78-0.81. The floors (mean over both categories: image AUROC >= 0.6, pixel AUROC
>= 0.65) leave room for seed noise; an untrained network, a constant map or a map that ignores the
input sits near 0.5 and fails them.
"""

from __future__ import annotations

import pytest
import torch

from defectscope.engine import run_experiment

RUNS = {"sae": {"epochs": 20}, "dae": {"epochs": 8}}


@pytest.fixture(scope="module")
def ae_synth(tmp_path_factory):
    from defectscope.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("ae"), image_size=64, channels=1, n_train=60, n_test_good=24,
                          n_test_defect=6, seed=0, progress=False)


@pytest.mark.parametrize("name", ["sae", "dae"])
def test_autoencoder_learns_the_synthetic_set(name, ae_synth):
    recs = [run_experiment(name, {**RUNS[name], "image_size": 64}, f"mvtec:{ae_synth}", cat, measure=False)
            for cat in ("washer", "fabric")]
    image = sum(r["image_auroc"] for r in recs) / 2
    pixel = sum(r["pixel_auroc"] for r in recs) / 2
    assert image >= 0.6, recs
    assert pixel >= 0.65, recs
    assert all(0 < r["aupro"] <= 1 for r in recs)


def test_image_size_not_a_multiple_is_a_clear_error():
    from defectscope.errors import DefectscopeError
    from defectscope.models import create_model

    with pytest.raises(DefectscopeError, match="multiple of 4.*--image-size 64"):
        create_model("sae", image_size=66, channels=1, epochs=1).fit([{"image": torch.zeros(1, 66, 66)}])
