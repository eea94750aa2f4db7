"""Upstream LLM providers (the built-in mock lives in `rungate.providers.mock`)."""
