"""Shared test helpers (importable as `testkit`: pytest puts `tests/` on sys.path)."""
