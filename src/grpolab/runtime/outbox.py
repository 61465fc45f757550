"""An ordered sender beside a stage's work: what a stage logs to its tracking store goes out in order on a thread
of its own, and what the store did not take while it was away is kept and sent again, with a backoff, until it
answers. The stage never waits for the store, except where it asks to (`settle`: at its end).

Sending something again must not log it twice: the tracking module makes each send idempotent (a metric batch
keeps its timestamps, which MLflow's SQL store de-duplicates; a file is replaced, not appended to).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from tqdm import tqdm

FIRST_RETRY_S = 1.0  # the backoff between tries at a store that does not answer: doubled each time, up to
MAX_RETRY_S = 10.0  # this, so a store that is back is noticed within seconds (after the client's own retries)


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    found: list[BaseException] = []
    while exc is not None and exc not in found:  # a chain can loop back on itself
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (`ConnectionRefusedError`, not MLflow's three wrappings of it)."""
    return chain(exc)[-1]


class Outbox:
    """Sends what is `put` in order, one at a time, on a thread of its own. A send that fails because the store is
    away (`away(exc)` true) is tried again, after a backoff, until it goes through; one line says that the store
    went away and one that it is back. Any other failure is kept and raised by the next `put` or `settle`:
    nothing after it is sent."""

    def __init__(self, where: str, away: Callable[[BaseException], bool]):
        self.where, self._away = where, away  # `where` names the store in the two lines
        self._items: deque[tuple[Callable[[], None], str]] = deque()  # the head stays until it went through
        self._cond = threading.Condition()
        self._refused: BaseException | None = None
        self._down_since: float | None = None  # monotonic time of the first failed send of an outage
        self.last_error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    @property
    def unsent(self) -> int:
        return len(self._items)

    @property
    def down_for(self) -> float | None:
        """Seconds since the store stopped answering; None while it answers."""
        since = self._down_since
        return None if since is None else time.monotonic() - since

    def put(self, send: Callable[[], None], what: str) -> None:
        """Queue `send` (`what` it sends, for the lines about it); raises what made an earlier send fail for good."""
        with self._cond:
            self._raise_refusal()
            if self._closed:
                raise RuntimeError(f"nothing more can be sent to {self.where}: its outbox is closed")
            self._items.append((send, what))
            self._cond.notify_all()

    def settle(self, patience_s: float) -> bool:
        """Wait until everything put so far went through: True; False once the store has not answered for
        `patience_s` seconds since this call (a store that answers, however slowly, is waited for)."""
        began = time.monotonic()
        with self._cond:
            while self._items and self._refused is None:
                if self._down_since is None:
                    self._cond.wait()
                    continue
                waited = time.monotonic() - max(self._down_since, began)
                if waited >= patience_s:
                    return False
                self._cond.wait(patience_s - waited)
            self._raise_refusal()
            return True

    def close(self) -> None:
        """Stop sending; what is still queued stays unsent (`settle` first to send it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=1)  # a send stuck in the client's own retries is left to its daemon thread

    def _raise_refusal(self) -> None:
        if self._refused is not None:
            raise self._refused

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                send, what = self._items[0]
            try:
                send()
            except Exception as exc:  # every failure is sorted: away (sent again) or refused (raised by the stage)
                if not self._away(exc):
                    with self._cond:
                        self._refused = exc
                        self._cond.notify_all()
                    return
                self._went_away(exc, what)
                with self._cond:  # the backoff, cut short by `close`
                    self._cond.wait_for(lambda: self._closed, timeout=delay)
                delay = min(2 * delay, MAX_RETRY_S)
                continue
            delay = FIRST_RETRY_S
            with self._cond:
                self._items.popleft()
                back = self._down_since
                self._down_since = None
                self._cond.notify_all()
            if back is not None:
                _say(f"{self.where} answers again after {time.monotonic() - back:.0f} s: sending the {len(self._items)} "
                     "records that waited")

    def _went_away(self, exc: BaseException, what: str) -> None:
        self.last_error = exc
        with self._cond:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
                self._cond.notify_all()  # a `settle` now counts the outage
        if first:
            cause = root_cause(exc)
            _say(f"{self.where} does not answer ({type(cause).__name__}: {cause}; sending {what}); the stage goes on "
                 f"and keeps what it logs ({len(self._items)} records so far) to send when the store answers again")


def _say(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # on a line of its own, above a stage's progress bar if it draws one
