"""The serving runtime (paper §4.2): block servers, the orchestrator around the shared dispatcher, the
OpenAI-compatible API, metrics and launchers. The layers below it (model, analysis, plan, dispatch,
adapt, methods, sim) never import torch, HTTP or RPC code; ``measure``, ``experiments`` and ``cli``
above it may (``tests/test_import_boundary.py`` holds both)."""
