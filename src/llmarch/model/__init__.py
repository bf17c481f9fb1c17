"""The model: its configuration and the one decoder's building blocks (attention, MLA, MoE, caches, norms, RoPE, FFNs,
small-device components).

Module protocols: the duck-typed attributes that code outside a module reads (defined by -> read by).

* ``param_component`` (str): RMSNorm, Attention, MLAttention, GLU, MLP, Router, Experts, Laurel, AltUp,
  PerLayerInput, PerLayerEmbedding -> ``analysis.modules.param_breakdown`` files the module's parameters under it.
* ``child_components`` ({child name: component}): MoE, Decoder -> ``analysis.modules.param_breakdown``.
* ``describe()`` (dict): Attention and MLAttention (the same keys), GLU, MLP and MoE (the same keys) ->
  ``analysis.modules``, ``analysis.compare``, ``analysis.diagram``.
* ``make_cache(batch, max_len, dtype, device)`` (a LayerCache, or None: no cache): Attention, MLAttention ->
  ``cache.KVCache.for_model``.
* ``kv_bytes_per_token(bytes_per_element)``: Attention, MLAttention -> ``analysis.modules``, ``analysis.compare``.
* ``inactive_params_per_token()``: MoE -> ``analysis.modules`` (active parameters, FLOPs).
* ``offloadable_params()``: PerLayerEmbedding -> ``analysis.params`` (effective parameters).
* ``reads_weights`` (child names): MLAttention, AltUp -> ``inference.packed.release_weights`` keeps those weights.
* ``logit_observer`` (None or a callable): Attention, MLAttention -> ``training.optim`` (QK-clip) sets it.
* ``last_routing`` (Routing): MoE -> ``training.balance`` (load-balancing losses and bias updates).
* Seams, methods ``inference.packed`` overrides in its subclasses: ``Attention.project``, ``.qkv_heads``,
  ``.attend``; ``GLU.gate_and_up``; ``Experts.expert``, ``.run_batched``.
"""
