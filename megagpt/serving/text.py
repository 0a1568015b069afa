"""The text a completion shows so far: unfinished characters held back, stop strings cut.

Decoding token ids one at a time can end between the bytes of one character (the tokenizer
decodes them as U+FFFD); ``megagpt.inference.pipeline.complete_text`` cuts those, so a streamed
delta never carries half a character. A stop string can also arrive over several tokens: the
longest tail that could still grow into one is held back until it either completes (the text is
cut before it) or cannot (it is released).
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
        self._candidate = ""  # completion text including the held-back stop prefix
        self.stopped = False

    def _completion(self, generated: list[int]) -> str:
        full = complete_text(
            self.tokenizer.decode(self.prompt + generated), keep=len(self.prompt_text)
        )
        if full.startswith(self.prompt_text):
            return full[len(self.prompt_text) :]
        # A tokenizer whose decoding of the prompt changes once text follows (rare): the
        # continuation's own decoding is the best answer.
        return complete_text(self.tokenizer.decode(generated))

    def advance(self, generated: list[int]) -> tuple[str, bool]:
        """(delta, stopped) after the generated ids grew."""
        text = self._completion(generated)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._show(text[: min(hits)]), True
        self._candidate = text
        return self._show(text[: len(text) - self._held(text)]), False

    def finish(self) -> str:
        """The delta released at the end (a tail that never became a stop string)."""
        return "" if self.stopped else self._show(self._candidate)

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
