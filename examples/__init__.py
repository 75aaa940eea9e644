"""Examples of handoffd in use: the echo demo and a pre-fork HTTP server."""
