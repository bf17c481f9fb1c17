"""The model: its configuration and the one decoder's building blocks (attention, MLA, MoE, caches, norms, RoPE, FFNs)."""
