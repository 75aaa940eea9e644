"""The trio runtime: acceptor, worker library, supervisor, client, control."""
