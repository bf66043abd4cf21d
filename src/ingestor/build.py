"""Which build of the Cython core is loaded: light enough for every command's start-up (the
metrics module, which also reports it, imports the Prometheus client)."""

from __future__ import annotations

import logging


def core_build() -> str:
    """``"debug"`` when the Cython core is the debug build (``make debug``/``make test`` leave
    it in a checkout: checks on, several times slower), else ``"release"``."""
    from ingestor import DEBUG

    return "debug" if DEBUG else "release"


def warn_debug_build(what: str) -> None:
    """One WARNING line at the start of ``what`` (``run``, ``replay``) on the debug core."""
    if core_build() == "debug":
        logging.getLogger("ingestor").warning(
            "%s on the DEBUG build of the core (checks on, several times slower): for "
            "production, install a release build (make compile, or pip install .)", what)
