"""The echo server demo: acceptor + pre-forked workers + concurrent clients."""
