"""A Flask (WSGI) app behind handoffd: ``[workers] wsgi = "examples.flask.app:app"``."""
