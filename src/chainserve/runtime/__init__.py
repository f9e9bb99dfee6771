"""The serving runtime (paper §4.2): block servers, the orchestrator around the shared dispatcher, the
OpenAI-compatible API, metrics and launchers. The only package that imports torch, HTTP or RPC code."""
