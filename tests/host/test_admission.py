"""Admission: each refusal, its error class, code, close code and reason."""

from __future__ import annotations

import pytest

from voice_agent.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_TRY_AGAIN,
    ModelLoading,
    ServerFull,
    ShuttingDown,
    TooManyFromAddress,
    to_wire,
)
from voice_agent.host.admission import Admission

TRY_AGAIN = CLOSE_TRY_AGAIN


def opened(max_sessions: int = 3, per_address: int = 2) -> Admission:
    admission = Admission(max_sessions=max_sessions, per_address=per_address)
    admission.loading = False
    return admission


@pytest.mark.parametrize(
    ("exc", "code", "close_code", "reason"),
    [
        (ModelLoading, "loading", CLOSE_TRY_AGAIN, "the model is loading, try again later"),
        (
            ServerFull,
            "server_full",
            CLOSE_TRY_AGAIN,
            "server at its session limit, try again later",
        ),
        (
            TooManyFromAddress,
            "address_limit",
            CLOSE_TRY_AGAIN,
            "too many connections from this address",
        ),
        (ShuttingDown, "shutting_down", CLOSE_GOING_AWAY, "server shutting down"),
    ],
)
def test_refusals_map_to_their_close(
    exc: type[Exception], code: str, close_code: int, reason: str
) -> None:
    wire = to_wire(exc())
    assert (wire.code, wire.close_code, wire.message) == (code, close_code, reason)


def test_loading_refuses_until_the_engine_started() -> None:
    admission = Admission(max_sessions=3, per_address=2)
    with pytest.raises(ModelLoading) as refused:
        admission.admit("10.0.0.1")
    assert "loading" in str(refused.value)  # what the page matches
    admission.loading = False
    assert admission.admit("10.0.0.1").address == "10.0.0.1"
    assert admission.refused == {"loading": 1}


def test_session_limit_and_release() -> None:
    admission = opened(max_sessions=2, per_address=5)
    a, b = admission.admit("1"), admission.admit("2")
    with pytest.raises(ServerFull):
        admission.admit("3")
    a.release()
    a.release()  # idempotent: frees one place only
    assert admission.open == 1
    with admission.admit("3"):
        assert admission.open == 2
    assert admission.open == 1
    b.release()
    assert admission.open == 0


def test_per_address_limit() -> None:
    admission = opened(max_sessions=10, per_address=2)
    first = admission.admit("10.0.0.1")
    admission.admit("10.0.0.1")
    with pytest.raises(TooManyFromAddress):
        admission.admit("10.0.0.1")
    other = admission.admit("10.0.0.2")  # another address is not affected
    first.release()
    admission.admit("10.0.0.1")
    other.release()
    assert admission.held_by("10.0.0.2") == 0
    assert admission.refused == {"address_limit": 1}
    admission.admit("")  # no address: not limited per address
    admission.admit("")
    admission.admit("")


def test_shutting_down_comes_first() -> None:
    admission = Admission(max_sessions=0, per_address=0)  # loading and full too
    admission.shutting_down = True
    with pytest.raises(ShuttingDown):
        admission.check("x")
    assert admission.open == 0
