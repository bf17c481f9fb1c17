"""llmarch: the modern open-weight LLM architectures in one readable PyTorch codebase.

    import llmarch
    cfg = llmarch.get_config("qwen3-0.6b")           # a published configuration
    print(llmarch.count_params(cfg))                  # counted on the meta device
    model = llmarch.from_pretrained("path/to/hf_dir")  # or a .gguf file
    logits = model(torch.tensor([[1, 2, 3]]))
    llmarch.quantize(model, "int4", group_size=32)   # weight-only int4 for CPU inference, in place
"""

from .analysis.params import count_params
from .checkpoints.hf import from_pretrained, save_pretrained
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GenerationError,
    LlmarchError,
)
from .families import get_config, preset_names
from .inference.quant import quantize
from .model.config import ModelConfig, RopeConfig
from .model.decoder import Decoder, build_model

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
