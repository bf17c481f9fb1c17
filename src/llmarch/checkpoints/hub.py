"""Checkpoints from the Hugging Face Hub: ``--model org/name``, ``org/name@revision``, ``org/name:file.gguf``.

Downloads go through ``huggingface_hub`` and so use its cache (``HF_HUB_CACHE`` / ``HF_HOME``),
its offline mode (``HF_HUB_OFFLINE=1``: only what the cache holds) and its token
(``HF_TOKEN`` or ``huggingface-cli login``) for gated and private repositories. A whole
repository is fetched as an HF checkpoint directory (config, safetensors, tokenizer files);
``:file.gguf`` fetches that one GGUF file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

# org/name, then optionally @revision, then optionally :file (the Hub's own name rules)
_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?::(?P<file>[^:]+))?$")
# the files of an HF checkpoint directory llmarch reads
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None
    filename: str | None = None


def parse_hub_id(spec: str) -> HubId | None:
    """The parts of ``org/name[@revision][:file]``, or None when ``spec`` is not shaped so."""
    m = _HUB_ID.match(spec)
    if m is None or spec.startswith((".", "/", "~")):
        return None
    return HubId(m["repo"], m["revision"], m["file"])


def download(spec: str) -> Path:
    """A local path for Hub id ``spec``: the cached snapshot directory, or the one file."""
    hub_id = parse_hub_id(spec)
    if hub_id is None:
        raise CheckpointError(f"{spec!r} is not a Hub id (expected org/name, org/name@revision or org/name:file.gguf)")
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise CheckpointError(f"loading {spec!r} from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub") from e
    try:
        if hub_id.filename:
            return Path(hf.hf_hub_download(hub_id.repo, hub_id.filename, revision=hub_id.revision))
        return Path(hf.snapshot_download(hub_id.repo, revision=hub_id.revision, allow_patterns=CHECKPOINT_FILES))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"cannot fetch {spec!r} from the Hugging Face Hub: it is not in the local cache and the Hub cannot be "
            f"reached (offline, or HF_HUB_OFFLINE=1). Connect and retry, or download it on a connected machine "
            f"with `huggingface-cli download {hub_id.repo}` and copy the cache ({constants.HF_HUB_CACHE})"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointError(
            f"cannot fetch {spec!r} from the Hugging Face Hub: {e}. Check the repository and file names; for a "
            f"gated or private repository set HF_TOKEN or run `huggingface-cli login`"
        ) from e
