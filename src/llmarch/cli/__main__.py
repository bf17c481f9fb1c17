"""``python -m llmarch.cli``: the same as the ``llmarch`` command."""

from . import entry

entry()
