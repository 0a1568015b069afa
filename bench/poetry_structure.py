"""The poetry quality check: do sampled continuations keep the 5/7-character line structure?

For each test poem, the prompt is its first line ("白日依山尽，"); the model continues it with the
default decoding (nucleus p=0.9, T=1.0). A continuation keeps the structure when its first
``--lines`` complete lines (ended by ，。！？；) each have exactly as many Han characters as the
prompt's line (5 or 7). Prints the share, and a few samples.

    python bench/poetry_structure.py --model runs/poetry/model --poems 200 --seed 1
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "poetry" / "test.jsonl"
_LINE = re.compile(r"[^，。！？；]*[，。！？；]")
_HAN = re.compile(r"[\u3400-\u9fff]")


def first_line(poem: str) -> str:
    m = _LINE.match(poem)
    return m.group(0) if m else poem


def keeps_structure(prompt: str, text: str, lines: int) -> bool:
    """True when the ``lines`` complete lines after ``prompt`` in ``text`` have the prompt
    line's count of Han characters."""
    width = len(_HAN.findall(prompt))
    rest = text.removeprefix(prompt)
    got = _LINE.findall(rest)[:lines]
    return len(got) == lines and all(
        len(_HAN.findall(g)) == width and len(g) == width + 1 for g in got
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="megagpt model directory")
    ap.add_argument("--test", default=str(DEFAULT_TEST), help="poetry test.jsonl (text1)")
    ap.add_argument("--poems", type=int, default=200, help="first N test poems")
    ap.add_argument("--lines", type=int, default=3, help="generated lines that must conform")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show", type=int, default=5, help="samples to print")
    args = ap.parse_args()

    from megagpt import pipeline

    poems = [
        json.loads(x)["text1"]
        for x in Path(args.test).read_text(encoding="utf-8").splitlines()[: args.poems]
    ]
    prompts = [first_line(p) for p in poems]
    pipe = pipeline("text-generation", model=args.model, device="cpu")
    outs = pipe(prompts, max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=16)
    ok = [keeps_structure(p, o["text"], args.lines) for p, o in zip(prompts, outs)]
    share = sum(ok) / len(ok)
    for o in outs[: args.show]:
        print("  " + o["text"].replace("\n", " ")[:80])
    print(
        json.dumps(
            {
                "model": args.model,
                "poems": len(ok),
                "lines": args.lines,
                "keeps_structure": round(share, 4),
            },
            ensure_ascii=False,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
