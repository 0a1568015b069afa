"""What a completion shows while it grows (megagpt.serving.text): no half characters (the
fixtures' byte-level BPE splits 龘, 鱻, 𠀀 and 😀 over several tokens) and no part of a stop
string, yet nothing lost at the end."""

from __future__ import annotations

import pytest

from megagpt.serving.text import CompletionText

PROMPT = "北京"
CONTINUATION = "龘鱻好𠀀，😀"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megagpt.data import build_tokenizer
    from tests.unit.inference.conftest import shared_assets

    return build_tokenizer(shared_assets(tmp_path_factory)["tokenizer"])


def feed(tokenizer, text: str, stops=()) -> tuple[list[str], CompletionText]:
    ids = tokenizer.encode(text)
    state = CompletionText(tokenizer, tokenizer.encode(PROMPT), stops)
    deltas = []
    for i in range(1, len(ids) + 1):
        delta, stopped = state.advance(ids[:i])
        deltas.append(delta)
        if stopped:
            break
    deltas.append(state.finish())
    return deltas, state


def test_deltas_never_carry_half_a_character(tokenizer):
    ids = tokenizer.encode(CONTINUATION)
    assert len(ids) > len(CONTINUATION)  # the precondition: characters split over tokens
    deltas, state = feed(tokenizer, CONTINUATION)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == CONTINUATION == state.text
    assert [d for d in deltas if d] == list(CONTINUATION)  # each character once, whole


def test_stop_string_is_cut_and_its_prefix_held_back(tokenizer):
    deltas, state = feed(tokenizer, "好的，我们走吧。", stops=("我们走",))
    assert "".join(deltas) == "好的，"
    assert state.stopped
    # "我们" alone could still become "我们走": it is held until the text decides.
    deltas, _ = feed(tokenizer, "好的，我们来吧。", stops=("我们走",))
    assert "".join(deltas) == "好的，我们来吧。"


def test_held_tail_is_released_at_the_end(tokenizer):
    deltas, state = feed(tokenizer, "好的，我们", stops=("我们走",))
    assert "".join(deltas[:-1]) == "好的，"  # held while it could still become the stop
    assert deltas[-1] == "我们" and state.text == "好的，我们"
