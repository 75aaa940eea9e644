"""A Starlette (ASGI) app behind handoffd: ``[workers] asgi = "examples.asgi.app:app"``."""
