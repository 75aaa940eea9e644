"""A small pre-fork HTTP/1.1 server whose workers receive connections from handoffd."""
