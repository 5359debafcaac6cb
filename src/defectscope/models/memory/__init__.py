"""Memory-bank methods: features of normal images are stored (or summarised by statistics) and a
test patch is scored by its distance to them (PatchCore, PaDiM, SPADE, Gaussian AD, DFKDE, DFM,
and PatchCluster for the blind setting)."""
