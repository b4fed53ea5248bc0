"""The sentence splitter: same pieces whatever the deltas, sensible cuts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from voice_agent.tts.split import SentenceSplitter

TEXT = (
    'Hello there! Dr. Smith paid 3.50 dollars, i.e. not much. Is that right?" '
    "Yes... J. R. R. Tolkien wrote it.\nNew line here "
)


def split_all(text: str, cuts: list[int] | None = None, **kwargs: int) -> list[str]:
    splitter = SentenceSplitter(**kwargs)
    out: list[str] = []
    last = 0
    for cut in sorted(cuts or []):
        out += splitter.feed(text[last:cut])
        last = cut
    out += splitter.feed(text[last:])
    return out + splitter.flush()


def test_sentences_abbreviations_and_decimals() -> None:
    assert split_all(TEXT) == [
        "Hello there!",
        "Dr. Smith paid 3.50 dollars, i.e. not much.",
        'Is that right?"',
        "Yes...",
        "J. R. R. Tolkien wrote it.",
        "New line here",
    ]


def test_a_sentence_is_released_once_the_next_character_decides() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hi there.") == []  # could be "there.5" or an abbreviation
    assert splitter.feed(" Next") == ["Hi there."]
    assert splitter.feed(" one") == []
    assert splitter.flush() == ["Next one"]
    assert splitter.flush() == []


def test_clauses_cut_only_when_long_enough() -> None:
    short = "Well, yes, I think so and that is fine."
    assert split_all(short, first_words=0) == [short]
    long = "When the morning light came over the hills and the valley, we went out, and ran."
    assert split_all(long, clause_chars=40, first_words=0) == [
        "When the morning light came over the hills and the valley,",
        "we went out, and ran.",
    ]
    # later pieces keep the rule when the first one is cut early
    assert split_all("So. " + short) == ["So.", short]


def test_the_first_piece_ends_at_a_clause_mark_or_after_a_few_words() -> None:
    assert split_all("Sure, I switched on the kitchen light. The hall stays dark, as asked.") == [
        "Sure,",
        "I switched on the kitchen light.",
        "The hall stays dark, as asked.",
    ]
    assert split_all("I switched on the kitchen light for you. It is bright.") == [
        "I switched on",
        "the kitchen light for you.",
        "It is bright.",
    ]
    assert split_all("Yes! It is on, and bright.") == ["Yes!", "It is on, and bright."]
    # numbers and abbreviations are words, not ends: "3,5" and "Dr." do not cut
    assert split_all("Dr. Smith paid 3,5 dollars today.") == [
        "Dr. Smith paid",
        "3,5 dollars today.",
    ]
    assert split_all("Hi there", first_words=2) == ["Hi there"]  # no boundary yet: at flush
    assert split_all("One two three four five six.", first_words=2) == [
        "One two",
        "three four five six.",
    ]


def test_long_words_cut_the_first_piece_by_its_characters() -> None:
    # synthesis time follows the text's length: 18 characters end it at a word boundary
    assert split_all("Supercalifragilistic expialidocious words are long ones.") == [
        "Supercalifragilistic",
        "expialidocious words are long ones.",
    ]
    assert split_all("Antidisestablishmentarianism is long.") == [
        "Antidisestablishmentarianism",
        "is long.",
    ]
    assert split_all("Alpha beta gamma", first_chars=10) == ["Alpha beta", "gamma"]


def test_the_first_word_cut_waits_for_the_boundary() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("I switched on") == []  # "on" may go on ("once")
    assert splitter.feed("ce") == []
    assert splitter.feed(" the") == ["I switched once"]
    assert splitter.feed(" light, now") == []  # later pieces: whole sentences
    assert splitter.flush() == ["the light, now"]


def test_unspeakable_openings_do_not_count_as_the_first_piece() -> None:
    assert split_all("... Sure, fine, I will do that now.") == [
        "Sure,",
        "fine, I will do that now.",
    ]


def test_unpunctuated_text_is_cut_at_a_bounded_length() -> None:
    text = " ".join(["word"] * 200)
    pieces = split_all(text, max_chars=50)
    assert len(pieces) > 10
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces) == text  # cut at spaces, nothing lost
    hard = split_all("x" * 130, max_chars=50)
    assert hard == ["x" * 50, "x" * 50, "x" * 30]


def test_nothing_to_say_is_dropped() -> None:
    assert split_all("... — !") == []
    assert split_all("") == []


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab .,!?\n3\"'Dr")), max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=20),
)
def test_any_split_of_the_deltas_gives_the_same_pieces(text: str, cuts: list[int]) -> None:
    whole = split_all(text, max_chars=40, clause_chars=20)
    assert (
        split_all(text, [c for c in cuts if c <= len(text)], max_chars=40, clause_chars=20) == whole
    )
    # a cut never waits on an endless clause (trailing punctuation belongs to its sentence)
    assert all(len(p.rstrip(".!?\"' ")) <= 41 for p in whole)


@given(st.text(alphabet=st.sampled_from(list("ab .")), max_size=200))
def test_every_character_of_speakable_text_is_kept(text: str) -> None:
    pieces = split_all(text, max_chars=30, clause_chars=10)
    kept = "".join("".join(p.split()) for p in pieces)
    expected = "".join(text.split())
    # only pieces without a letter (runs of dots) may be dropped
    assert kept.replace(".", "") == expected.replace(".", "")
