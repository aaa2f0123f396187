"""llmwsctl: the operator's console for llmwsd, and the Python client library.

This package is the plain ``pip install llmws``: it needs websockets, and of llmwsd only
the modules without dependencies (errors, protocol), so that a machine that only chats
installs no torch, transformers, numpy or cryptography (tests/test_client_install.py).
"""
