"""The echo application (``make demo``): the sample app installed with the package,
:mod:`handoffd.apps.echo`, under the name the examples and tests have always used."""

from __future__ import annotations

from handoffd.apps.echo import handler

__all__ = ["handler"]
