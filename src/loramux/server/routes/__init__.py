"""The server's routes, one module per resource, sharing the server's `Context`."""
