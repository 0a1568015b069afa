"""Streaming never shows half a character: the byte-level BPE of the fixtures splits rare
characters over several tokens (龘 = 2 tokens, 鱻 = 3, 𠀀 = 4), and a prefix of them decodes to
U+FFFD. The pipeline's stream and text, and `megagpt generate --stream`, hold such bytes back
until the character completes."""

from __future__ import annotations

import argparse

import pytest
import torch

from megagpt.inference.generate import DecodeState
from megagpt.inference.pipeline import TextGenerationPipeline, complete_text

PROMPT = "北京"
CONTINUATION = "龘鱻好𠀀，😀"
BAD = "\ufffd"


class Scripted:
    """A stand-in generator that "decodes" a fixed continuation, one token per step (the model
    is not what is under test: what the pipeline shows of each step is)."""

    def __init__(self, continuation: list[int]):
        from megagpt.inference.sampling import GenerationDefaults

        self.continuation = continuation
        self.defaults = GenerationDefaults()

    def limits(self, lengths, max_length=None, max_new_tokens=None):
        n = len(self.continuation) if max_new_tokens is None else max_new_tokens
        return [length + n for length in lengths]

    def keys_for(self, prompts, copies, seed):
        return [0] * (len(prompts) * copies)

    def steps(self, prompts, params, limits, keys=None, use_cache=True):
        (prompt,) = prompts
        new = self.continuation[: limits[0] - len(prompt)]
        tokens = torch.tensor([prompt + new])
        for i in range(1, len(new) + 1):
            yield DecodeState(
                tokens, torch.tensor([len(prompt) + i]), torch.tensor([i == len(new)])
            )

    def generate(self, prompts, params, max_new_tokens=None, **kw):
        return [[p + self.continuation[:max_new_tokens]] for p in prompts]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from megagpt.data import build_tokenizer

    return build_tokenizer(tokenizer_dir)


def scripted_pipe(tokenizer, text: str = CONTINUATION) -> TextGenerationPipeline:
    return TextGenerationPipeline(Scripted(tokenizer.encode(text)), tokenizer)


def test_the_tokenizer_really_splits_characters(tokenizer):
    """The precondition of the other tests: some token prefixes decode to U+FFFD."""
    ids = tokenizer.encode(CONTINUATION)
    prefixes = [tokenizer.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    assert sum(BAD in p for p in prefixes) >= 5
    assert prefixes[-1] == CONTINUATION


def test_stream_holds_back_unfinished_characters(tokenizer):
    pipe = scripted_pipe(tokenizer)
    parts = [p["text"] for p in pipe.stream(PROMPT)]
    assert not any(BAD in p for p in parts), parts
    for before, after in zip(parts, parts[1:]):  # each part extends the last: deltas print
        assert after.startswith(before) and after != before
    assert parts[-1] == PROMPT + CONTINUATION
    # Every character shows up once complete: 龘, 鱻, 好, 𠀀, "，", 😀.
    assert len(parts) == len(CONTINUATION)


def test_text_cut_mid_character_ends_at_the_last_whole_one(tokenizer):
    pipe = scripted_pipe(tokenizer)
    n = len(tokenizer.encode("龘鱻")) - 1  # the last byte of 鱻 missing
    assert pipe(PROMPT, max_new_tokens=n)["text"] == PROMPT + "龘"
    parts = [p["text"] for p in pipe.stream(PROMPT, max_new_tokens=n)]
    assert parts[-1] == PROMPT + "龘" and not any(BAD in p for p in parts)


def test_invalid_bytes_mid_text_are_not_held_forever(tokenizer):
    """A lead byte followed by ASCII never completes: the decoder's U+FFFD is shown once the
    next character arrives, as in the non-streamed text."""
    lead = tokenizer.encode("鱻")[:1]
    pipe = TextGenerationPipeline(Scripted(lead + tokenizer.encode("ab")), tokenizer)
    parts = [p["text"] for p in pipe.stream(PROMPT)]
    assert parts[-1] == PROMPT + BAD + "ab" == pipe(PROMPT)["text"]
    assert not parts[0].endswith(BAD)


def test_complete_text_keeps_the_prompt():
    assert complete_text("ab" + BAD + BAD) == "ab"
    assert complete_text("a" + BAD + "b") == "a" + BAD + "b"
    assert complete_text("ab" + BAD, keep=3) == "ab" + BAD


def test_cli_stream_prints_whole_characters(tokenizer, tiny_model_dir, monkeypatch, capsys):
    from megagpt.inference import cli, pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "pipeline", lambda *a, **kw: scripted_pipe(tokenizer))
    parser = argparse.ArgumentParser()
    cli.add_generate_parser(parser.add_subparsers())
    # --model: a real directory, whose config.json the command checks before any loading.
    argv = ["generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--stream"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out == PROMPT + CONTINUATION + "\n"


def test_a_bert_stream_only_extends_under_modelscope_word_joining():
    """A ## piece after a Chinese character changes the space before that word (ModelScope's
    joining): the stream shows a word only once the next has started, so no part is taken
    back, and the last part is the whole text."""
    from megagpt.data import build_tokenizer
    from tests.conftest import BERT_VOCAB, shared_path

    bert = build_tokenizer(str(shared_path(BERT_VOCAB)))
    pieces = ["中", "##a", "国", "人", "。"]
    pipe = TextGenerationPipeline(Scripted([bert._tok.token_to_id(p) for p in pieces]), bert)
    parts = [p["text"] for p in pipe.stream("床前明月光")]
    for before, after in zip(parts, parts[1:]):
        assert after.startswith(before) and after != before
    assert parts[-1] == pipe("床前明月光")["text"] == "床前明月光 中a 国人。"


def test_a_stream_that_adds_no_visible_text_still_yields_the_text(tokenizer):
    """Tokens that never complete a character (the limit cuts one): one part, the text."""
    lead = tokenizer.encode("鱻")[:1]
    pipe = TextGenerationPipeline(Scripted(lead), tokenizer)
    parts = [p["text"] for p in pipe.stream(PROMPT)]
    assert parts == [pipe(PROMPT)["text"]] == [PROMPT]
