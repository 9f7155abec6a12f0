"""TextStream (incremental detokenization with stop strings) on the default model's byte-level BPE
tokenizer. The references are the tokenizer's own full `decode` and plain string operations."""

from __future__ import annotations

import pytest

from loramux.engine.detokenizer import TextStream
from loramux.model.loader import load_tokenizer, resolve_model_dir

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok():
    """The default model's tokenizer (the one `default_engine.tokenizer` is), loaded without the model."""
    _, path = resolve_model_dir(None)
    return load_tokenizer(path)


def enc(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def dec(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def run_pieces(tok, parts, stop=()):
    """Pushes the ids of each part (encoded on its own); returns the stream, one (text released while
    pushing that part, stopped after it) per part, and finish()."""
    ts = TextStream(tok, stop)
    steps = []
    for part in parts:
        ids = enc(tok, part)
        assert dec(tok, ids) == part
        deltas = [ts.push(i) for i in ids]
        steps.append(("".join(d for d, _ in deltas), deltas[-1][1]))
    return ts, steps, ts.finish()


def run(tok, ids, stop=()):
    """Pushes ids one at a time; returns the stream, the (delta, stopped) of each push, and finish().
    Also checks after every push that `text` is what was released so far."""
    ts = TextStream(tok, stop)
    steps = []
    released = ""
    for i in ids:
        delta, stopped = ts.push(i)
        steps.append((delta, stopped))
        released += delta
        assert ts.text == released
        assert ts.stopped == stopped
    return ts, steps, ts.finish()


def reference_hold(text: str, stops) -> int:
    """Length of the longest end of `text` that is a proper (shorter) start of some stop string."""
    best = 0
    for s in stops:
        for n in range(1, len(s)):
            if text.endswith(s[:n]):
                best = max(best, n)
    return best


TEXTS = [
    "Hello, world! This is plain ASCII text.",
    "naïve façade déjà vu, où ça? Crème brûlée à l'été.",
    "你好世界，这是中文。",
    "🙂👍🏽",
    "Emoji 🙂👍🏽 between words 🎉🚀 and\nnew lines\n\n  indented 😀 done",
    "中文混合 English 😀 text\n\nline\twith tab, élan 👨‍👩‍👧",
    "\n\n  \t x  trailing spaces   ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pushing_one_token_at_a_time_rebuilds_the_decoded_text(tok, text):
    ids = enc(tok, text)
    expected = dec(tok, ids)
    assert expected == text  # the tokenizer round-trips these texts
    ts, steps, rest = run(tok, ids)
    released = ""
    for n, (delta, stopped) in enumerate(steps, start=1):
        assert not stopped
        assert REPLACEMENT not in delta, (n, delta)
        released += delta
        # nothing released is ever taken back: it stays a prefix of the final text
        assert expected.startswith(released), (n, released)
        # released as soon as final: when the ids so far end on a complete character, all of it is out
        so_far = dec(tok, ids[:n])
        if not so_far.endswith(REPLACEMENT):
            assert released == so_far, (n, released, so_far)
    assert REPLACEMENT not in rest
    assert released + rest == expected
    assert ts.text == expected


def test_special_tokens_in_the_middle_are_skipped(tok):
    eos = tok.eos_token_id
    ids = enc(tok, "Hello") + [eos] + enc(tok, " wörld 🙂") + [eos]
    ts, steps, rest = run(tok, ids)
    assert "".join(d for d, _ in steps) + rest == dec(tok, ids) == "Hello wörld 🙂"


@pytest.mark.parametrize("emoji", ["🙂", "👍🏽", "🎉🚀", "👨‍👩‍👧"])
def test_multibyte_characters_are_never_split(tok, emoji):
    ids = enc(tok, emoji)
    assert len(ids) > len(emoji)  # the premise: some characters span several tokens
    ts = TextStream(tok)
    released = ""
    for n in range(1, len(ids) + 1):
        delta, stopped = ts.push(ids[n - 1])
        assert not stopped
        assert REPLACEMENT not in delta, (n, delta)
        released += delta
        # independent reference: the bytes so far decoded, without a trailing incomplete character
        so_far = dec(tok, ids[:n])
        complete = so_far.rstrip(REPLACEMENT)
        assert complete.startswith(released), (n, released, complete)
        if so_far == complete:  # the ids end on a character boundary: all of it is out
            assert released == complete, (n, released, complete)
    assert released == emoji
    assert ts.finish() == ""


def test_emoji_intermediate_pushes_return_nothing(tok):
    # "🙂" is two tokens: F0 9F | 99 82; "👍" is three: F0 9F | 91 | 8D
    ids = enc(tok, "🙂👍")
    ts = TextStream(tok)
    deltas = [ts.push(i)[0] for i in ids]
    boundaries = [n for n in range(1, len(ids) + 1) if not dec(tok, ids[:n]).endswith(REPLACEMENT)]
    assert boundaries == [2, len(ids)]
    assert deltas == ["", "🙂"] + [""] * (len(ids) - 3) + ["👍"]


def test_finish_releases_a_dangling_partial_character(tok):
    ids = enc(tok, "ok 🙂")[:-1]  # cut inside the emoji
    ts, steps, rest = run(tok, ids)
    assert "".join(d for d, _ in steps) == "ok"
    assert "".join(d for d, _ in steps) + rest == dec(tok, ids)


# --- stop strings -------------------------------------------------------------------------------


def test_stop_string_is_held_back_then_stops(tok):
    assert all(len(enc(tok, p)) == 1 for p in ("Par", "is", "."))
    ts, steps, rest = run_pieces(tok, ["City=", "Par", "is", ".", " More", " text"], stop=["Paris."])
    assert steps[0] == ("City=", False)
    assert steps[1] == ("", False)  # "Par" could start "Paris."
    assert steps[2] == ("", False)  # "Paris" still could
    assert steps[3] == ("", True)  # "." completes it
    assert all(s == ("", True) for s in steps[4:])  # nothing after the stop
    assert rest == ""
    assert ts.text == "City="
    assert ts.stopped


def test_text_that_cannot_match_is_released_once_disambiguated(tok):
    ts, steps, rest = run_pieces(tok, ["City=", "Par", "rot", " flies"], stop=["Paris."])
    assert steps == [("City=", False), ("", False), ("Parrot", False), (" flies", False)]
    assert rest == ""
    assert ts.text == "City=Parrot flies"


def test_a_failed_partial_match_followed_by_a_new_one(tok):
    ts, steps, rest = run_pieces(tok, ["Par", " Paris", ".", " end"], stop=["Paris."])
    assert steps[0] == ("", False)
    assert steps[1] == ("Par ", False)  # "Par" failed, " Paris" may still start the stop
    assert steps[2] == ("", True)
    assert ts.text == "Par " and rest == ""


def test_stop_string_spanning_several_tokens(tok):
    ids = enc(tok, "Hello, world! Stop here END now")
    assert len(ids) >= 6
    stop = "world! Stop"
    ts, steps, rest = run(tok, ids, stop=[stop])
    full = dec(tok, ids)
    completes = next(n for n in range(1, len(ids) + 1) if stop in dec(tok, ids[:n]))
    first_in = next(n for n in range(1, len(ids) + 1) if "world" in dec(tok, ids[:n]))
    assert completes - first_in >= 2  # the stop string does span several tokens
    assert [s for _, s in steps] == [n >= completes for n in range(1, len(ids) + 1)]
    assert "".join(d for d, _ in steps) + rest == ts.text == full[: full.index(stop)] == "Hello, "


@pytest.mark.parametrize("stops", [("ello", "lo"), ("lo", "ello")])
def test_earliest_of_several_stop_strings_wins_within_one_token(tok, stops):
    ids = enc(tok, "Hello there")
    assert dec(tok, ids[:1]) == "Hello"  # both stops complete on the first token
    ts, steps, rest = run(tok, ids, stop=stops)
    assert steps[0] == ("H", True)
    assert ts.text == "H"


@pytest.mark.parametrize("stops", [(" END", "here"), ("here", " END")])
def test_earliest_of_several_stop_strings_wins(tok, stops):
    ids = enc(tok, "Hello, world! Stop here END now")
    ts, steps, rest = run(tok, ids, stop=stops)
    assert ts.text == "Hello, world! Stop "
    assert "".join(d for d, _ in steps) + rest == ts.text


def test_finish_releases_a_held_back_prefix_of_a_stop_string(tok):
    ts, steps, rest = run_pieces(tok, ["City=", "Par"], stop=["Paris."])
    assert steps == [("City=", False), ("", False)]
    assert rest == "Par"
    assert ts.text == "City=Par"


def test_finish_after_a_stop_releases_nothing(tok):
    ids = enc(tok, "a Paris. b")
    ts, steps, rest = run(tok, ids, stop=["Paris."])
    assert rest == ""
    assert ts.text == "a "


CASES = [
    ("The capital of France is Paris. It is a big city.", ["Paris.", "big"]),
    ("The capital of France is Paris. It is a big city.", ["is a", "city"]),
    ("naïve façade déjà vu, où ça? Crème brûlée.", ["ça?", "vu, o"]),
    ("Emoji 🙂👍🏽 between words 🎉🚀 and more", ["👍🏽 b", "🎉"]),
    ("Emoji 🙂👍🏽 between words 🎉🚀 and more", ["🚀 and"]),
    ("aaaaab aab", ["aab"]),
    ("abababac", ["ababac", "bac"]),
    ("no stop here at all", ["zzz", "stop hered"]),
    ("你好世界，这是中文。", ["世界，这", "中文"]),
]


@pytest.mark.parametrize("text,stops", CASES)
def test_stop_strings_against_a_reference(tok, text, stops):
    ids = enc(tok, text)
    full = dec(tok, ids)
    hits = [full.find(s) for s in stops if s in full]
    final = full[: min(hits)] if hits else full
    stop_at = next((n for n in range(1, len(ids) + 1) if any(s in dec(tok, ids[:n]) for s in stops)), None)
    ts, steps, rest = run(tok, ids, stop=stops)
    released = ""
    for n, (delta, stopped) in enumerate(steps, start=1):
        assert REPLACEMENT not in delta
        released += delta
        assert stopped == (stop_at is not None and n >= stop_at), n
        assert final.startswith(released), (n, released, final)
        so_far = dec(tok, ids[:n])
        if not stopped and not so_far.endswith(REPLACEMENT):
            # everything that can no longer start a stop string is out
            assert released == so_far[: len(so_far) - reference_hold(so_far, stops)], (n, released, so_far)
    assert released + rest == ts.text == final
