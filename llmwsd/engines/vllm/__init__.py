"""The vLLM engine (``[engine] backend = "vllm"``): llmws in front of vLLM's v1 AsyncLLM."""
