"""Reconstruction methods: a network trained to reproduce normal images fails to reproduce a
defect; the per-pixel error is the anomaly map (the benchmark guide's SAE and DAE)."""
