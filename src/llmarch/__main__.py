"""``python -m llmarch``: the same as the ``llmarch`` command."""

from .cli import main

raise SystemExit(main())
