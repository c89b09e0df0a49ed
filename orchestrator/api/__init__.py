"""Tollgate's HTTP API (FastAPI). `orchestrator.api.app.create_app()` builds it."""
