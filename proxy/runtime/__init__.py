"""Event loop, signals, reload and graceful shutdown."""
