"""Feature-adaptation methods: frozen ImageNet features adapted to the target domain (CFA's coupled
hyperspheres, ReConPatch's contrastive projection, SuperSimpleNet's adaptor trained on feature-space
noise, also supervised with a few labelled defects)."""
