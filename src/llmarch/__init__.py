"""llmarch: the modern open-weight LLM architectures in one readable PyTorch codebase.

    import llmarch
    cfg = llmarch.get_config("qwen3-0.6b")           # a published configuration
    print(llmarch.count_params(cfg))                  # counted on the meta device
    model = llmarch.from_pretrained("path/to/hf_dir")  # or a .gguf file
    logits = model(torch.tensor([[1, 2, 3]]))
    llmarch.quantize(model, "int4", group_size=32)   # weight-only int4 for CPU inference, in place
"""

from __future__ import annotations

from typing import Any

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GenerationError,
    LlmarchError,
)


def __getattr__(name: str) -> Any:
    """The part of the API that needs torch, imported on first use: ``import llmarch`` (and the CLI) stays light."""
    if name not in __all__:
        raise AttributeError(f"module 'llmarch' has no attribute {name!r}")
    from .analysis.params import count_params
    from .checkpoints.hf import from_pretrained, save_pretrained
    from .families import get_config, preset_names
    from .inference.quant import quantize
    from .model.config import ModelConfig, RopeConfig
    from .model.decoder import Decoder, build_model

    api = {"count_params": count_params, "from_pretrained": from_pretrained, "save_pretrained": save_pretrained,
           "get_config": get_config, "preset_names": preset_names, "ModelConfig": ModelConfig,
           "RopeConfig": RopeConfig, "Decoder": Decoder, "build_model": build_model, "quantize": quantize}
    globals().update(api)
    return api[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "RopeConfig",
    "Decoder",
    "build_model",
    "get_config",
    "preset_names",
    "count_params",
    "from_pretrained",
    "save_pretrained",
    "quantize",
    "LlmarchError",
    "ConfigError",
    "CheckpointError",
    "GenerationError",
    "DataError",
]
