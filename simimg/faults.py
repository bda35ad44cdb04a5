"""A crash hook for tests: with $SIMIMG_CRASH_AT=k the process kills itself (SIGKILL: no cleanup, no finally) at
the k-th publish step it reaches, so a test can prove that a crash at any step leaves an index that opens at its old
or its new version, passes `simimg verify`, and lets the next run finish (tests/test_faults.py).

Publish steps are the moments a writer changes what readers may see: a file renamed into place (`fsutil`), a model
folder published (`store.model_store`), a version committed to the catalog and the tidying after it (`jobs.index`).
Unset (always, outside tests) a step costs one environment lookup.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal

CRASH_ENV = "SIMIMG_CRASH_AT"

log = logging.getLogger(__name__)
_reached = itertools.count(1)


def publish_step(what: str) -> None:
    """Mark one publish step; the k-th one reached kills the process when $SIMIMG_CRASH_AT is k."""
    at = os.environ.get(CRASH_ENV)
    if at and next(_reached) == int(at):
        log.warning("crash hook: killed at publish step %s (%s)", at, what)
        os.kill(os.getpid(), signal.SIGKILL)
