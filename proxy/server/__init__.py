"""Client-facing side: the asyncio protocol, flow control, listeners, drain."""
