"""Runs inside the engine process."""
