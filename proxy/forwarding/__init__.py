"""The request cycle: route, select an upstream, send, stream the response back."""
