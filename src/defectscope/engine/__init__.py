"""Fit / evaluate loops, timing and memory probes, and the shared training loop."""

from .evaluate import evaluate, hardware, measure_speed, peak_rss_mb, predict_dataset, run_experiment
from .train import auto_device, load_images, seed_everything, train_loop

__all__ = ["evaluate", "hardware", "measure_speed", "peak_rss_mb", "predict_dataset", "run_experiment",
           "auto_device", "load_images", "seed_everything", "train_loop"]
