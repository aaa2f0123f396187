"""The operator's admin socket (llmwsctl)."""
