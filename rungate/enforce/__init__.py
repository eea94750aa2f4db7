"""Enforcement: policy documents and the pure rules that decide each call (no I/O here)."""
