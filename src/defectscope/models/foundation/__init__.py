"""Foundation-model methods: Dinomaly (a frozen DINOv2 encoder, multi-class), WinCLIP / WinCLIP+
(CLIP, zero- and few-shot) and VLM-AD (a vision-language model server that says why)."""
