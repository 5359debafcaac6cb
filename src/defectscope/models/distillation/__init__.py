"""Knowledge-distillation methods: a student learns to reproduce a frozen teacher on normal images
and fails on anomalies (STFPM, Reverse Distillation, FRE, EfficientAD; the PDN teacher of
EfficientAD is distilled offline by :mod:`.teacher`)."""
