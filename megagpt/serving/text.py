"""The text a completion shows so far: text later tokens could still change held back, stop
strings cut.

Decoding token ids one at a time can end between the bytes of one character (the tokenizer
decodes them as U+FFFD), and a BERT-vocabulary text's last word can still grow and change the
space before it (ModelScope's word joining): ``Tokenizer.decode_stable`` is the part no later
token changes, so a streamed delta never has to be taken back. A stop string can also arrive
over several tokens: the longest tail that could still grow into one is held back until it
either completes (the text is cut before it) or cannot (it is released). ``finish`` releases
the rest, from the whole decoding.
"""

from __future__ import annotations

from megagpt.inference.pipeline import complete_text


class CompletionText:
    """Incremental text of one completion (``prompt`` ids + generated ids).

    ``advance(generated)`` returns the new visible text (a delta) and whether a stop string
    ended it; ``finish()`` releases what was held back for a stop string at the end.
    """

    def __init__(self, tokenizer, prompt: list[int], stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.prompt_text = tokenizer.decode(prompt)
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # visible completion text so far (sent to the client)
        self._generated: list[int] = []  # the ids of the last advance
        self.stopped = False

    def _completion(self, generated: list[int], final: bool) -> str:
        """The completion's text: the whole decoding's (``final``) or its stable start's, past
        the prompt's text."""
        keep = len(self.prompt_text)
        ids = self.prompt + generated
        tok = self.tokenizer
        full = complete_text(tok.decode(ids), keep) if final else tok.decode_stable(ids, keep)
        if full.startswith(self.prompt_text):
            return full[len(self.prompt_text) :]
        if self.prompt_text.startswith(full) and not final:
            return ""  # the prompt's own last word may still change: nothing to show yet
        # A tokenizer whose decoding of the prompt changes once text follows (a ## piece on a
        # BERT prompt's last word): the continuation's own decoding is the best answer.
        return complete_text(tok.decode(generated)) if final else tok.decode_stable(generated)

    def advance(self, generated: list[int]) -> tuple[str, bool]:
        """(delta, stopped) after the generated ids grew."""
        self._generated = list(generated)
        return self._update(self._completion(generated, final=False), final=False)

    def finish(self) -> str:
        """The delta released at the end: the text held back (a tail that never became a stop
        string, a last word) from the whole decoding, cut at a stop string found in it."""
        if self.stopped:
            return ""
        return self._update(self._completion(self._generated, final=True), final=True)[0]

    def _update(self, text: str, final: bool) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._show(text[: min(hits)]), True
        return self._show(text if final else text[: len(text) - self._held(text)]), False

    def _held(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _show(self, visible: str) -> str:
        if not visible.startswith(self.text):  # never un-send text: only ever extend
            return ""
        delta, self.text = visible[len(self.text) :], visible
        return delta
