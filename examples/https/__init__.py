"""HTTPS in front of pre-forked workers: curl and browsers reach workers that never hold
the TLS private key (``make demo-https``)."""
