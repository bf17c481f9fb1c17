"""llmarch."""
