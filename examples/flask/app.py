"""A Flask application that handoffd's workers serve with hypercorn (``[workers] wsgi``):
the serving worker and the client's authenticated identity, from
``environ["handoffd.peer"]`` (set by handoffd, never by a client header)."""

from __future__ import annotations

import os
import time

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def whoami():  # type: ignore[no-untyped-def]
    return jsonify(worker_pid=os.getpid(), scheme=request.scheme,
                   peer=request.environ.get("handoffd.peer", {}))


@app.get("/slow")
def slow():  # type: ignore[no-untyped-def]
    """Answers after ``?seconds=`` (at most 10): a request in progress across a reload."""
    time.sleep(min(10.0, float(request.args.get("seconds", "1"))))
    return jsonify(worker_pid=os.getpid(), slept=True)


@app.get("/fail")
def fail():  # type: ignore[no-untyped-def]
    raise RuntimeError("the example's failing route")
