"""Fit / evaluate one experiment: timing and memory probes, the result record."""

from .evaluate import (evaluate, hardware, measure_speed, peak_rss_mb, predict_dataset, run_experiment,
                       run_experiments, test_saved_model)
from .record import ResultRecord

__all__ = ["evaluate", "hardware", "measure_speed", "peak_rss_mb", "predict_dataset", "run_experiment",
           "run_experiments", "test_saved_model", "ResultRecord"]
