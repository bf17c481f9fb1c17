"""Inference: text generation and the CPU speed-ups that wrap the model from outside (packing, fusion, offload)."""
