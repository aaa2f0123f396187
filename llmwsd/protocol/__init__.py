"""The wire protocols, below everything else (they import only llmwsd.errors).

``messages``: every message of the public JSON protocol, typed (``shape``: how a
message maps to JSON); ``wire``: its framing, field parsers and the legacy text
mode; ``close_codes``: the WebSocket close codes; ``admin``: the admin socket's.
"""
