"""Exception hierarchy for llmarch."""

from __future__ import annotations


class LlmarchError(Exception):
    """Base class of every error raised deliberately by llmarch."""


class CheckpointError(LlmarchError, ValueError):
    """A checkpoint (GGUF file, HF directory, packaged asset) is missing, corrupt or unsupported."""


class ConfigError(LlmarchError, ValueError):
    """A model configuration is invalid or inconsistent."""
