"""Errors the orchestrator raises on purpose; `OrchestratorError` is the root."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Root of the orchestrator's own errors."""


class UnknownApiKey(OrchestratorError):
    pass
