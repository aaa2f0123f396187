"""llmwsctl: the operator's console for llmwsd, and the Python client library."""
