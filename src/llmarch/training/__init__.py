"""Training small versions of the architectures, one module per job:

* ``data``: tokenise a corpus into memory-mapped train/val token files; batches as a function of the step;
* ``scale``: the scale-down rule (``tiny`` / ``small``), ``--set`` overrides, the configuration a run trains;
* ``config``: :class:`~llmarch.training.config.TrainConfig`, the settings of one run;
* ``schedule``: the learning-rate schedule (warmup, cosine or WSD);
* ``spikes``: loss spikes and gradient-norm outliers against a robust rolling baseline;
* ``stats``: mean and 95% interval over seeds, paired differences against a baseline;
* ``ngram``: unigram / bigram reference losses on the validation targets a run scores;
* ``optim``: AdamW, Muon and MuonClip's QK-clip;
* ``balance``: MoE load balancing (auxiliary loss, DeepSeek-V3's bias update) and expert-load logging;
* ``distributed``: data parallelism under ``torchrun`` (DDP or FSDP2);
* ``checkpointing``: ``checkpoint.safetensors`` (tensors + JSON, no pickle) save and exact resume;
* ``loop``: weight init, the training loop, evaluation, metrics and the run summary;
* ``ablate``: train a set of variants under one budget over several seeds (with a per-variant LR sweep);
* ``ablate_results``: an ablation's results.json / results.md / results.csv and plots, with seed statistics.
"""
