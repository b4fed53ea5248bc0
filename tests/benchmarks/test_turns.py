"""benchmarks/turns.py's harness, on a tiny sweep: cases run through the
LiveSession on the virtual clock and are scored as the user feels them (a
tone stands in for Piper; no timing is asserted, only what happened)."""

from __future__ import annotations

import pytest

from benchmarks.turn_cases import Case, build_cases
from benchmarks.turn_felt import score
from benchmarks.turn_sim import CachedSpeech, Meter, Run, simulate
from benchmarks.turns import Policy, analyze, choose, continuation_available, result
from tests.helpers.tts import ToneTTS
from voice_agent.protocol import ReplyCancelled

LDC = "ldc93s1-16k-mono.wav"


@pytest.fixture(scope="module")
def cases() -> tuple[Case, Case]:
    all_cases = build_cases([LDC])
    whole = next(c for c in all_cases if c.kind == "whole")
    cut = next(c for c in all_cases if c.kind == "cut" and c.pause_ms == 1200)
    return whole, cut


def run(case: Case, policy: Policy) -> Run:
    meter = Meter()
    return simulate(case, policy.config(None), CachedSpeech(ToneTTS(), meter), meter)


def test_a_whole_sentence_is_one_turn_answered_after_its_last_word(
    cases: tuple[Case, Case],
) -> None:
    whole, _ = cases
    felt = score(whole, run(whole, Policy(hangover_ms=600)))
    assert not felt.fragment and not felt.split
    assert felt.latency_ms is not None and felt.latency_ms > 0  # audio came after the last word
    assert felt.talk_over_ms == []


def test_a_short_hangover_answers_the_fragment_without_continuation(
    cases: tuple[Case, Case],
) -> None:
    _, cut = cases
    r = run(cut, Policy(hangover_ms=300))
    felt = score(cut, r)
    assert felt.split and felt.fragment
    assert len(felt.talk_over_ms) == 1  # the fragment's reply played when the user went on
    assert [h.role for h in r.history] == ["user", "assistant", "user", "assistant"]


@pytest.mark.skipif(not continuation_available(), reason="no continuation in SessionConfig")
def test_continuation_takes_the_fragments_reply_back(cases: tuple[Case, Case]) -> None:
    _, cut = cases
    r = run(cut, Policy(hangover_ms=300, window_ms=3000, heard_ms=3000))
    felt = score(cut, r)
    assert felt.split and not felt.fragment and felt.continued == 1
    assert any(isinstance(e, ReplyCancelled) and e.reason == "continued" for _, e in r.events)
    assert [h.role for h in r.history] == ["user", "assistant"]
    assert r.engine_user_turns == 1


def test_the_rule_picks_the_fastest_policy_without_fragments(cases: tuple[Case, Case]) -> None:
    whole, cut = cases
    results = {}
    for p in (Policy(hangover_ms=300), Policy(hangover_ms=1300)):
        felt = [score(c, run(c, p)) for c in (whole, cut)]
        results[p.name] = result(p, felt)
    assert results["silence 300 ms"]["fragment_rate_cut"] == 1.0
    got = choose(results, [LDC])
    assert got is not None and got[0] == "silence 1300 ms" and got[2]  # by the rule
    assert analyze(results, [LDC])["picked"]["name"] == "silence 1300 ms"
