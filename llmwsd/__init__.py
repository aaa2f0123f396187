"""llmwsd: serve a local LLM over a resumable WebSocket API, managed like a system service."""

__version__ = "0.1.0"
