"""Foundation-model methods (WinCLIP, Dinomaly, UniNet, VLM-AD): planned, none registered yet."""
