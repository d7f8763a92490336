"""Every background job of the plugin starts here.

A job is a function (or a generator function, whose yielded values are progress) run off the
main thread by napari's thread workers; its callbacks run on the main thread. With
``NAPARI_SPATIALSSL_SYNC_WORKERS=1`` (tests) jobs run inline, in the caller's thread, with the same
callbacks in the same order. The Session receives a runner and never imports Qt itself.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

SYNC_ENV = "NAPARI_SPATIALSSL_SYNC_WORKERS"


def sync_workers() -> bool:
    return os.environ.get(SYNC_ENV, "").lower() in ("1", "true", "yes")


@dataclass
class Callbacks:
    on_yield: Callable[[Any], None] | None = None
    on_return: Callable[[Any], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    on_finish: Callable[[], None] | None = None


def _call(fn, *args) -> None:
    if fn is not None:
        fn(*args)


def run_inline(fn: Callable, args: tuple, cb: Callbacks) -> None:
    """Run `fn(*args)` now; a generator's values go to on_yield, its return value to on_return."""
    try:
        if inspect.isgeneratorfunction(fn):
            gen = fn(*args)
            while True:
                try:
                    _call(cb.on_yield, next(gen))
                except StopIteration as stop:
                    _call(cb.on_return, stop.value)
                    break
        else:
            _call(cb.on_return, fn(*args))
    except Exception as exc:  # noqa: BLE001 - handed to the caller's error callback
        if cb.on_error is None:
            raise
        cb.on_error(exc)
    finally:
        _call(cb.on_finish)


class Runner:
    """Starts jobs: napari thread workers, or inline when `sync` (default: the environment variable)."""

    def __init__(self, sync: bool | None = None):
        self.sync = sync_workers() if sync is None else sync
        self._alive: set = set()  # keep workers referenced until they finish

    def start(self, fn: Callable, *args, on_yield=None, on_return=None, on_error=None, on_finish=None):
        cb = Callbacks(on_yield, on_return, on_error, on_finish)
        if self.sync:
            run_inline(fn, args, cb)
            return None
        from napari.qt.threading import create_worker

        worker = create_worker(fn, *args, _start_thread=False)
        if on_yield is not None and hasattr(worker, "yielded"):
            worker.yielded.connect(on_yield)
        if on_return is not None:
            worker.returned.connect(on_return)
        if on_error is not None:
            worker.errored.connect(on_error)
        self._alive.add(worker)

        def finished():
            self._alive.discard(worker)
            _call(on_finish)

        worker.finished.connect(finished)
        worker.start()
        return worker


class InlineRunner(Runner):
    """A Runner that always runs jobs inline (a Session without Qt, e.g. in tests or scripts)."""

    def __init__(self):
        super().__init__(sync=True)
