"""``megagpt clean`` end to end: determinism across workers, resume after SIGKILL, bad lines,
input formats, the duplicates file and the CLI's one-line errors."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megagpt.cli import main
from megagpt.curation.config import load_clean_config
from megagpt.curation.pipeline import STATE_DIR, clean
from megagpt.curation.synthetic import EDITS, JUNK, near_copy
from megagpt.data.errors import BadRecordError, DataError
from megagpt.data.readers import make_input_spec

from .conftest import ROOT, write_jsonl


def _corpus(tmp_path: Path, wiki_docs: list[str]) -> tuple[list[Path], dict[int, int]]:
    """Two files: real paragraphs, planted near copies (across files), junk, exact copies.
    Returns the files and {line of a planted copy in b.jsonl: line of its original}."""
    rng = random.Random(0)
    docs = wiki_docs[:60]
    a = write_jsonl(tmp_path / "a.jsonl", docs)
    b_texts, truth = [], {}
    for i in range(20):
        truth[len(b_texts) + 1] = i + 1
        b_texts.append(
            near_copy(docs[i], rng, EDITS[i % 4], docs[i + 30]) if i < 16 else docs[i]
        )  # 16 near copies, 4 exact copies
        maker, _ = list(JUNK.values())[i % len(JUNK)]
        b_texts.append(maker(docs[40 + i % 20], rng))
    b = write_jsonl(tmp_path / "b.jsonl", b_texts)
    return [a, b], truth


def _outputs(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}
    report = json.loads((out / "report.json").read_text())
    report.pop("timing")
    files["report"] = json.dumps(report, sort_keys=True).encode()
    return files


def _cfg(**overrides):
    return load_clean_config(None, [f"{k}={v}" for k, v in overrides.items()])


def test_dedup_precision_recall_and_duplicates_file(tmp_path, wiki_docs):
    files, truth = _corpus(tmp_path, wiki_docs)
    specs = [make_input_spec(str(f)) for f in files]
    report = clean(specs, str(tmp_path / "out"), _cfg(), progress=False)
    dups = [json.loads(x) for x in (tmp_path / "out" / "duplicates.jsonl").read_text().splitlines()]
    removed = {int(d["removed"].rsplit(":", 1)[1]): d for d in dups}
    assert all(d["removed"].startswith(str(files[1])) for d in dups)  # no false positive
    hits = [
        line
        for line in truth
        if line in removed and removed[line]["kept"] == f"{files[0]}:{truth[line]}"
    ]
    assert len(hits) / len(truth) >= 0.9  # recall on planted copies
    # the 4 verbatim copies are exact; punctuation-only edits also are after normalisation
    assert all(removed[line]["kind"] == "exact" for line, orig in truth.items() if orig > 16)
    j = report.to_json()
    assert j["filters"]["exact-duplicate"]["documents"] >= 8
    assert j["documents"]["written"] + j["documents"]["removed"] == j["documents"]["records"]
    for name, (_, expected) in JUNK.items():  # every planted junk kind shows in the report
        if expected != "boilerplate":
            assert j["filters"][expected]["documents"] >= 1, name
    assert j["lines"]["boilerplate"]["lines"] >= 2


def test_byte_identical_for_1_and_2_workers(tmp_path, wiki_docs):
    files, _ = _corpus(tmp_path, wiki_docs)
    specs = [make_input_spec(str(f)) for f in files]
    cfg = _cfg(**{"output.chunk_docs": 7, "output.shard_bytes": 20000})
    clean(specs, str(tmp_path / "w1"), cfg, workers=1, progress=False)
    clean(specs, str(tmp_path / "w2"), cfg, workers=2, progress=False)
    one, two = _outputs(tmp_path / "w1"), _outputs(tmp_path / "w2")
    assert len([k for k in one if k.startswith("part-")]) > 2  # several shards
    assert one == two


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, wiki_docs):
    files, _ = _corpus(tmp_path, wiki_docs)
    sets = ["output.chunk_docs=5", "output.commit_chunks=2", "output.shard_bytes=15000"]
    cmd = [
        sys.executable,
        "-m",
        "megagpt.cli",
        "clean",
        "--input",
        *map(str, files),
        "--no-progress",
        "--workers",
        "2",
    ] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        cmd + ["--output", str(tmp_path / "ref")], env=env, check=True, capture_output=True
    )
    # Commits fall after units 1, 3, 5, 7, 9 (journal next_chunk 2..10). Stall after unit 10:
    # its output is written and flushed but not committed; then SIGKILL the real process.
    out = tmp_path / "killed"
    # Its own session: the SIGKILL below goes to the whole job (main process and its 2 workers),
    # as a scheduler's kill does; a worker left behind would sleep forever and outlive the test.
    proc = subprocess.Popen(
        cmd + ["--output", str(out)],
        env=dict(env, MEGAGPT_CLEAN_STALL_AFTER_CHUNK="10"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    journal = out / STATE_DIR / "journal.jsonl"

    def uncommitted() -> bool:
        """The last commit before the stall (next_chunk 10) is in the journal and output past
        it is on disk (a later shard, or the shard grown past its committed size)."""
        text = journal.read_text() if journal.exists() else ""
        if not text.endswith("\n"):  # no commit yet, or its line still being written
            return False
        entry = json.loads(text.splitlines()[-1])
        if entry["next_chunk"] < 10:
            return False
        part = out / f"part-{entry['shard']:05d}.jsonl"
        later = [p for p in out.glob("part-*.jsonl") if int(p.name[5:10]) > entry["shard"]]
        return bool(later) or part.stat().st_size > entry["shard_bytes"]

    # Unit 10's output is written after the last commit's fsync, which a busy disk can hold up
    # for longer than any fixed sleep: wait for those bytes themselves. (A kill while they are
    # still being written is as good a test: the journal holds the committed sizes.)
    deadline = time.monotonic() + 120
    while not uncommitted():
        assert time.monotonic() < deadline, "no uncommitted output on disk after 120 s"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert proc.poll() is None  # still running (stalled), not finished
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    entry = json.loads(journal.read_text().splitlines()[-1])
    assert entry["next_chunk"] == 10 and not (out / "report.json").exists()
    assert uncommitted()  # what the resume must cut away
    done = subprocess.run(cmd + ["--output", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from work unit 10" in done.stderr
    assert _outputs(out) == _outputs(tmp_path / "ref")
    again = subprocess.run(cmd + ["--output", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already complete" in again.stderr


def test_bad_lines_error_with_file_line_or_are_counted(tmp_path, wiki_docs):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": wiki_docs[0]}, ensure_ascii=False).encode()
    path.write_bytes(
        b"\n".join(
            [
                good,
                b"{not json",
                json.dumps({"t": "x"}).encode(),
                b'{"text": "\xff\xfe"}',
                good.replace(b"\xe9\x95", b"\xe9\x95"),
            ]
        )
    )
    spec = make_input_spec(str(path))
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:2: malformed JSON"):
        clean([spec], str(tmp_path / "o1"), _cfg(), progress=False)
    report = clean([spec], str(tmp_path / "o2"), _cfg(), skip_bad_lines=True, progress=False)
    j = report.to_json()
    assert j["bad_records"]["counts"] == {"invalid-utf8": 1, "malformed-json": 1, "missing-key": 1}
    assert j["bad_records"]["examples"][0].endswith(
        "bad.jsonl:2: malformed JSON "
        "(Expecting property name enclosed in "
        "double quotes at column 2)"
    )
    assert j["documents"]["written"] == 1 and j["filters"]["exact-duplicate"]["documents"] == 1


def test_txt_csv_gz_inputs_and_text_key(tmp_path, wiki_docs):
    txt = tmp_path / "a.txt.gz"
    with gzip.open(txt, "wt", encoding="utf-8") as f:
        f.write("\n".join(wiki_docs[:3]) + "\n")
    csv_path = tmp_path / "b.csv"
    csv_path.write_text(
        "id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(wiki_docs[3:5])),
        encoding="utf-8",
    )
    specs = [make_input_spec(str(txt)), make_input_spec(str(csv_path), csv_column="body")]
    clean(specs, str(tmp_path / "o"), _cfg(**{"output.text_key": "content"}), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "o" / "part-00000.jsonl").read_text().splitlines()]
    assert [r["content"] for r in rows] == wiki_docs[:5]
    assert rows[3]["source"] == f"{csv_path}:2"


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(["clean", "--no-progress", *argv])
    return code, capsys.readouterr().err.strip()


def test_cli_one_line_errors(tmp_path, capsys, wiki_docs):
    f = write_jsonl(tmp_path / "a.jsonl", wiki_docs[:3])
    code, err = _cli(capsys, "--input", str(tmp_path / "nope.jsonl"), "--output", "o")
    assert (
        code == 2
        and err == f"megagpt clean: error: {tmp_path}/nope.jsonl: input file does not exist"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("filters:\n  min_charz: 10\n")
    code, err = _cli(capsys, "--input", str(f), "--output", "o", "--config", str(cfg))
    assert (
        code == 2
        and "unknown key 'filters.min_charz' (did you mean 'filters.min_chars'?)" in err
        and "\n" not in err
    )
    code, err = _cli(capsys, "--input", str(f), "--output", "o", "--set", "dedup.threshold=2")
    assert code == 2 and "dedup.threshold" in err
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    code, err = _cli(capsys, "--input", str(f), "--output", str(out))
    assert code == 2 and "not empty" in err


def test_changed_config_is_not_resumed(tmp_path, wiki_docs):
    f = write_jsonl(tmp_path / "a.jsonl", wiki_docs[:3])
    spec = make_input_spec(str(f))
    clean([spec], str(tmp_path / "o"), _cfg(), progress=False)
    with pytest.raises(DataError, match="other config"):
        clean([spec], str(tmp_path / "o"), _cfg(**{"dedup.threshold": 0.7}), progress=False)
    (tmp_path / "o" / "part-00099.jsonl").write_text("{}\n")  # a stale shard of another run
    report = clean(
        [spec],
        str(tmp_path / "o"),
        _cfg(**{"dedup.threshold": 0.7}),
        overwrite=True,
        progress=False,
    )
    assert report.records == 3  # started over, not appended to the first run
    manifest = json.loads((tmp_path / "o" / STATE_DIR / "manifest.json").read_text())
    assert manifest["config"]["dedup"]["threshold"] == 0.7
    # exactly the files of a fresh run with the new config, nothing of the old one left
    clean([spec], str(tmp_path / "fresh"), _cfg(**{"dedup.threshold": 0.7}), progress=False)
    assert _outputs(tmp_path / "o") == _outputs(tmp_path / "fresh")
    with pytest.raises(DataError, match="already complete"):
        clean([spec], str(tmp_path / "o"), _cfg(**{"dedup.threshold": 0.7}), progress=False)


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["clean", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    assert load_clean_config(str(tmp_path / "c.yaml")) == load_clean_config(None)
