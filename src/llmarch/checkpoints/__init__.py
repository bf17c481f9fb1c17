"""Checkpoint formats: Hugging Face safetensors, GGUF, FP8 blocks, tokenizers, the shipped model assets, MatFormer slicing."""
