"""Entry point for uvicorn workers: `uvicorn everloop.serve._main:app --factory`."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

from everloop.serve._app import create_app

PROJECT_ENV = "EVERLOOP_PROJECT"
UI_ENV = "EVERLOOP_SERVE_UI"  # "1": the workers mount the dashboard at /ui (`everloop serve --ui`)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

log = logging.getLogger("everloop.serve")


def app():  # noqa: D103 - uvicorn factory
    parent = multiprocessing.parent_process()
    if parent is not None:  # a worker of uvicorn's supervisor (--workers > 1): not a single-process server
        die_with_parent(parent.pid)
    return create_app(os.environ.get(PROJECT_ENV, "."), ui=os.environ.get(UI_ENV) == "1")


def die_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """SIGTERM this process (uvicorn's graceful stop) when the process `parent_pid` dies, even by SIGKILL:
    orphaned workers would go on answering with the port held, and a restart could not bind it. Linux:
    the kernel sends it (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls os.getppid() every
    `poll_seconds`."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl: no signal will come
                    os.kill(os.getpid(), signal.SIGTERM)
                return
        except (OSError, AttributeError):  # no prctl in this libc: poll instead
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        log.warning("the server's parent process %d is gone; this worker stops", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="everloop-parent-watch", daemon=True).start()
