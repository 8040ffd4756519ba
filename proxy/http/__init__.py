"""HTTP/1.1 pieces with no sockets: header rules, framing rules, error responses."""
