"""The public port: HTTP routes, the gate (hosts, origins, tokens, limits), connections."""
