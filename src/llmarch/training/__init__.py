"""Training: data preparation, the scale-down rule, the training loop, optimisers, MoE balancing, ablations."""
