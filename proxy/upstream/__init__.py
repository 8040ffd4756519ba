"""Upstream and Pool state, the keep-alive connection pool, the upstream-side protocol."""
