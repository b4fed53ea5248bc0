"""One admission check for every transport: is there room for one more session?

`Admission(max_sessions=..., per_address=...)`; the host sets `loading`
(the engine has not started yet) and `shutting_down`. `admit(address)`
returns a Ticket or raises, checked in this order:

    shutting down                     errors.ShuttingDown        close 1001
    the model is still loading        errors.ModelLoading        close 1013
    `max_sessions` tickets held       errors.ServerFull          close 1013
    `per_address` held by `address`   errors.TooManyFromAddress  close 1013

`admit(address, while_loading=True)` skips the loading check: for a
transport that must answer before the model is ready (Wyoming's describe:
Home Assistant's set-up fails on a refused connection) and refuses each
request that needs the engine itself while loading.

`Ticket.release()` (idempotent; also `with ticket:`) gives the place back.
Refusals are counted by error code (`refused`), for /metrics. An `address`
is whatever identifies the client to its transport (the peer IP for
WebSocket); an empty address is not limited per address.
"""

from __future__ import annotations

import logging
from types import TracebackType

from voice_agent.errors import (
    ModelLoading,
    ServerFull,
    ShuttingDown,
    TooManyFromAddress,
    VoiceAgentError,
)

logger = logging.getLogger("voice_agent.host")


class Ticket:
    """One admitted session's place; `release()` once it ends."""

    def __init__(self, admission: Admission, address: str) -> None:
        self._admission = admission
        self.address = address
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._admission._release(self.address)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """The session limits of one process; see the module doc."""

    def __init__(self, *, max_sessions: int, per_address: int) -> None:
        self.max_sessions = max_sessions
        self.per_address = per_address
        self.loading = True  # until the host says the engine has started
        self.shutting_down = False
        self.open = 0  # tickets held
        self._by_address: dict[str, int] = {}
        self.refused: dict[str, int] = {}  # refusals by error code

    def held_by(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def check(self, address: str = "", *, while_loading: bool = False) -> None:
        """Raise what `admit(address)` would refuse with, taking nothing."""
        error: VoiceAgentError | None = None
        if self.shutting_down:
            error = ShuttingDown()
        elif self.loading and not while_loading:
            error = ModelLoading()
        elif self.open >= self.max_sessions:
            error = ServerFull()
            logger.warning("session limit reached", extra={"limit": self.max_sessions})
        elif address and self.held_by(address) >= self.per_address:
            error = TooManyFromAddress()
            logger.warning("connection limit per client reached", extra={"limit": self.per_address})
        if error is not None:
            self.refused[error.code] = self.refused.get(error.code, 0) + 1
            raise error

    def admit(self, address: str = "", *, while_loading: bool = False) -> Ticket:
        """A place for one session from `address`, or the refusal (module doc)."""
        self.check(address, while_loading=while_loading)
        self.open += 1
        if address:
            self._by_address[address] = self.held_by(address) + 1
        return Ticket(self, address)

    def _release(self, address: str) -> None:
        self.open -= 1
        if not address:
            return
        left = self.held_by(address) - 1
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)
