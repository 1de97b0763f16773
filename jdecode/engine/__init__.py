"""Serving engine: requests, block manager, scheduler, runner, offline LLM API, server.

Importing this package imports no jax: the host-side modules are tested without it.
"""
