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


# -- a BERT vocabulary: ModelScope's word joining -------------------------------------------


@pytest.fixture(scope="module")
def bert():
    from megagpt.data import build_tokenizer
    from tests.conftest import BERT_VOCAB, shared_path

    return build_tokenizer(str(shared_path(BERT_VOCAB)))


def _ids(bert, pieces: list[str]) -> list[int]:
    ids = [bert._tok.token_to_id(p) for p in pieces]  # WordPiece pieces, "##" included
    assert None not in ids, pieces
    return ids


@pytest.mark.parametrize(
    ("prompt", "pieces", "final"),
    [
        # a ## piece after a Chinese character makes the word Latin-ish: the space before it
        # appears only once the word is complete (ModelScope's joining)
        ("床前明月光", ["中", "##a", "国", "人"], " 中a 国人"),
        # ... or on the prompt's own last word: the continuation is decoded on its own
        ("床前明月光", ["##a", "国", "人"], "a 国人"),
        ("我用", ["iphone", "15", "手", "机", "。"], " iphone 15 手机。"),
    ],
)
def test_bert_deltas_are_never_taken_back(bert, prompt, pieces, final):
    ids = _ids(bert, pieces)
    state = CompletionText(bert, bert.encode_prompt(prompt))
    deltas = [state.advance(ids[:i])[0] for i in range(1, len(ids) + 1)]
    deltas.append(state.finish())
    assert "".join(deltas) == state.text == final
    assert deltas[0] == ""  # a word is shown only once the next one has started


def test_bert_stable_decoding_is_a_start_of_every_later_decoding(bert):
    ids = bert.encode_prompt("我用") + _ids(
        bert, ["iphone", "##s", "15", "手", "##a", "机", "，", "ok"]
    )
    texts = [bert.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    stable = [bert.decode_stable(ids[:i]) for i in range(1, len(ids) + 1)]
    for i, s in enumerate(stable):
        assert all(t.startswith(s) for t in texts[i:]), (s, texts[i:])
    assert texts[-1] == "我用 iphones 15 手a 机， ok"
    assert bert.decode(_ids(bert, ["##a", "国"])) == "a 国"  # a text starting inside a word
