"""Serving many clients from one model: an OpenAI-compatible HTTP server over a continuous-batching
scheduler.

* :mod:`.cache` -- the batch's KV caches as *slots*: one row per sequence, each row with its
  own length, for every cache kind the model brings (full buffer, sliding/chunked ring, MLA
  latent), and the row operations the scheduler needs (copy a prefix, swap, clear).
* :mod:`.scheduler` -- :class:`~.scheduler.Scheduler`: one thread that runs every decoding
  sequence in one batched forward per step, prefills newcomers chunk by chunk between steps,
  drops finished or abandoned sequences at once and keeps finished rows to reuse their prefix.
* :mod:`.protocol` -- OpenAI request parsing and validation, response shapes, error JSON.
* :mod:`.app` -- the Starlette application (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, ``/health``), run by uvicorn from ``llmarch serve``.
"""
