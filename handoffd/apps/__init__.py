"""Sample applications installed with handoffd, so that a fresh install serves something
before you point ``[workers] app`` at your own (``systemd/handoffd.toml``)."""
