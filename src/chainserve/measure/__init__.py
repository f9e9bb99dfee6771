"""Measuring live servers (issue 7): profiling block servers (``profile``) and benchmarking an
OpenAI-compatible endpoint (``bench``), paper §4.2."""
