"""Exceptions raised by llmarch.

Every error a user can cause (a bad name, a bad config, a bad file, a bad generation
parameter) is one of these, with a message that says what was wrong and what was
expected. The command line prints the message and exits non-zero without a traceback.
"""


class LlmarchError(Exception):
    """Base class of every error llmarch raises on purpose."""


class ConfigError(LlmarchError, ValueError):
    """An architecture configuration that is unknown, inconsistent or unsupported."""


class CheckpointError(LlmarchError, ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not match its configuration."""


class GenerationError(LlmarchError, ValueError):
    """A generation request that cannot be served (empty prompt, bad sampling parameter...)."""


class DataError(LlmarchError, ValueError):
    """A corpus, tokenizer or prepared data folder that is missing, empty or too small."""
