"""`megagpt preprocess`: formats, determinism across workers, bad input, crash safety, CLI."""

from __future__ import annotations

import gzip
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from megagpt.data import DataError, IndexedDataset, make_input_spec, preprocess
from megagpt.data import indexed as indexed_module

# megagpt.data re-exports the function `preprocess`, which shadows the module's name.
preprocess_module = importlib.import_module("megagpt.data.preprocess")
from megagpt.data.cli import main  # noqa: E402


def _jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": 1, key: d}, ensure_ascii=False) + "\n" for d in docs)
    return str(path)


def _run(tmp_path, inputs, tok_dir, name="out", **kw):
    specs = [make_input_spec(str(p), **kw.pop("spec", {})) for p in inputs]
    kw.setdefault("progress", False)
    prefix = str(tmp_path / name)
    stats = preprocess(specs, str(tok_dir), prefix, **kw)
    return prefix, stats


def _docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_jsonl_tokens_match_the_tokenizer_and_end_with_eod(
    tmp_path, tokenizer, tokenizer_dir, wiki_texts
):
    src = _jsonl(tmp_path / "in.jsonl", wiki_texts[:30])
    prefix, stats = _run(tmp_path, [src], tokenizer_dir, append_eod=True)
    docs = _docs(prefix)
    assert docs == [tokenizer.encode(t) + [tokenizer.eod] for t in wiki_texts[:30]]
    assert stats.documents == 30 and stats.tokens == sum(map(len, docs))
    assert stats.num_skipped == 0 and stats.dtype == "uint16"
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]


def test_megatron_core_reads_preprocess_output(tmp_path, tokenizer, tokenizer_dir, wiki_texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
    src = _jsonl(tmp_path / "in.jsonl", wiki_texts[:10])
    prefix, _ = _run(tmp_path, [src], tokenizer_dir, append_eod=True)
    theirs = MegatronIndexed(prefix)
    for i, text in enumerate(wiki_texts[:10]):
        assert theirs[i].tolist() == tokenizer.encode(text) + [tokenizer.eod]


def test_text_csv_gz_and_several_inputs_in_order(tmp_path, tokenizer, tokenizer_dir):
    lines = tmp_path / "lines.txt"
    lines.write_text("第一篇文档。\n第二篇 document\n", encoding="utf-8")
    paras = tmp_path / "paras.txt"
    paras.write_text("\n段落一，第一行\n第二行\n\n\n段落二\n", encoding="utf-8")
    table = tmp_path / "table.csv"
    table.write_text('id,body\n1,"多行\n字段, 带逗号"\n2,普通\n', encoding="utf-8")
    packed = tmp_path / "packed.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "压缩的😀"}, ensure_ascii=False) + "\n")

    specs = [
        make_input_spec(str(lines)),
        make_input_spec(str(paras), paragraphs=True),
        make_input_spec(str(table), csv_column="body"),
        make_input_spec(str(packed)),
    ]
    prefix = str(tmp_path / "out")
    stats = preprocess(specs, str(tokenizer_dir), prefix, progress=False)
    expected = [
        "第一篇文档。",
        "第二篇 document",
        "段落一，第一行\n第二行",
        "段落二",
        "多行\n字段, 带逗号",
        "普通",
        "压缩的😀",
    ]
    assert [tokenizer.decode(d) for d in _docs(prefix)] == expected
    assert stats.documents == len(expected)


def test_byte_order_mark_is_not_part_of_the_first_document(tmp_path, tokenizer, tokenizer_dir):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + '{"text": "甲"}\n'.encode())
    (tmp_path / "b.txt").write_bytes(bom + "乙\n".encode())
    (tmp_path / "c.csv").write_bytes(bom + "text\n丙\n".encode())
    inputs = [tmp_path / n for n in ("a.jsonl", "b.txt", "c.csv")]
    prefix, _ = _run(tmp_path, inputs, tokenizer_dir)
    assert [tokenizer.decode(d) for d in _docs(prefix)] == ["甲", "乙", "丙"]


def test_output_is_identical_for_any_worker_count(tmp_path, tokenizer_dir, wiki_texts):
    src = _jsonl(tmp_path / "in.jsonl", wiki_texts)
    outputs = []
    for workers in (1, 2, 3):
        prefix, _ = _run(
            tmp_path,
            [src],
            tokenizer_dir,
            f"w{workers}",
            workers=workers,
            append_eod=True,
            chunk_docs=7,
        )
        outputs.append(tuple(Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")))
    assert outputs[0] == outputs[1] == outputs[2]


def _awkward_jsonl(path, texts) -> str:
    """jsonl with a byte-order mark, blank lines, CRLF endings and no final newline."""
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts]
    body = b"\xef\xbb\xbf" + lines[0] + b"\n\n"
    for i, line in enumerate(lines[1:]):
        body += line + (b"\r\n" if i % 3 == 0 else b"\n") + (b"  \n" if i % 7 == 0 else b"")
    path.write_bytes(body.rstrip(b"\r\n"))
    return str(path)


def test_workers_reading_their_own_byte_ranges_write_the_same_bytes(
    tmp_path, tokenizer_dir, wiki_texts
):
    src = _awkward_jsonl(tmp_path / "in.jsonl", wiki_texts[:120])
    text = tmp_path / "in.txt"
    text.write_text(
        "".join(t.replace("\n", " ") + "\n" for t in wiki_texts[120:160]), encoding="utf-8"
    )
    packed = tmp_path / "in.jsonl.gz"  # not splittable: records read by the main process
    with gzip.open(packed, "wb") as f:
        f.write(Path(src).read_bytes())
    inputs = [src, text, packed]
    outputs = []
    for workers, range_bytes in ((1, None), (2, 3000), (3, 777), (2, None)):
        prefix, stats = _run(
            tmp_path,
            inputs,
            tokenizer_dir,
            f"w{workers}r{range_bytes}",
            workers=workers,
            append_eod=True,
            chunk_docs=5,
            range_bytes=range_bytes,
        )
        outputs.append(tuple(Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")))
        assert stats.documents == 120 + 40 + 120
        if workers > 1:
            assert 1 <= len(stats.worker_cpu_seconds) <= workers
    assert all(out == outputs[0] for out in outputs[1:])
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]  # shards removed


def test_main_process_does_not_read_splittable_inputs(
    tmp_path, tokenizer_dir, wiki_texts, monkeypatch
):
    """With workers, a jsonl file is read by the workers, range by range, not by the main
    process (which on a small machine would compete with them for a core)."""
    src = _jsonl(tmp_path / "in.jsonl", wiki_texts[:40])
    expected, _ = _run(tmp_path, [src], tokenizer_dir, "one")

    def refuse(spec):
        raise AssertionError(f"main process read {spec.path}")

    monkeypatch.setattr(preprocess_module, "iter_raw_records", refuse)
    prefix, stats = _run(tmp_path, [src], tokenizer_dir, "two", workers=2, range_bytes=4096)
    assert _docs(prefix) == _docs(expected)
    assert stats.main_cpu_seconds >= 0 and len(stats.worker_cpu_seconds) == 2


def test_line_numbers_count_the_lines_of_earlier_ranges(tmp_path, tokenizer_dir):
    good = [json.dumps({"text": f"第{i}篇文档，内容。"}, ensure_ascii=False) for i in range(300)]
    lines = good[:100] + [""] * 5 + good[100:200] + ["{bad one"] + good[200:] + ["{bad two"]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _, stats = _run(
        tmp_path, [src], tokenizer_dir, "skip", workers=2, range_bytes=500, skip_bad_lines=True
    )
    assert stats.documents == 300
    assert stats.skipped_examples == [
        f"{src}:206: malformed JSON (Expecting property name "
        "enclosed in double quotes at column 2)",
        f"{src}:307: malformed JSON (Expecting property name "
        "enclosed in double quotes at column 2)",
    ]
    with pytest.raises(DataError, match=r"in\.jsonl:206: malformed JSON"):
        _run(tmp_path, [src], tokenizer_dir, workers=3, range_bytes=300)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "skip.bin", "skip.idx", "skip.vocab.json"]


BAD_RECORDS = [
    ("malformed-json", b'{"text": "unterminated\n', "malformed JSON"),
    ("invalid-utf8", b'{"text": "\xe4\xb8"}\n', "invalid UTF-8"),
    ("missing-key", b'{"body": "no text key"}\n', "no key 'text'"),
    ("empty-document", b'{"text": "   "}\n', "empty document"),
    ("not-a-string", b'{"text": 42}\n', "not a string"),
    ("invalid-utf8", b'{"text": "\\ud800 lone surrogate"}\n', "surrogate"),
    ("malformed-json", b'["a list"]\n', "expected a JSON object"),
]


def _with_bad_line(tmp_path, bad: bytes) -> str:
    path = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": f"第{i}篇"}, ensure_ascii=False).encode() + b"\n" for i in range(5)]
    path.write_bytes(b"".join(good[:3]) + bad + b"\n" + b"".join(good[3:]))  # bad is line 4
    return str(path)


@pytest.mark.parametrize(("reason", "bad", "message"), BAD_RECORDS)
def test_bad_record_is_an_error_naming_file_and_line(tmp_path, tokenizer_dir, reason, bad, message):
    src = _with_bad_line(tmp_path, bad)
    with pytest.raises(DataError, match=rf"bad\.jsonl:4: .*{message}.*\[{reason}\]"):
        _run(tmp_path, [src], tokenizer_dir)
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing half-written


@pytest.mark.parametrize(("reason", "bad", "message"), BAD_RECORDS)
def test_skip_bad_lines_skips_and_counts(tmp_path, tokenizer_dir, reason, bad, message):
    src = _with_bad_line(tmp_path, bad)
    _, stats = _run(tmp_path, [src], tokenizer_dir, skip_bad_lines=True)
    assert stats.documents == 5 and dict(stats.skipped) == {reason: 1}
    assert stats.skipped_examples[0].startswith(f"{src}:4: ")


def test_bad_text_and_csv_records(tmp_path, tokenizer_dir):
    text = tmp_path / "t.txt"
    text.write_bytes("好\n".encode() + b"\xff\xfe\n")
    with pytest.raises(DataError, match=r"t\.txt:2: invalid UTF-8"):
        _run(tmp_path, [text], tokenizer_dir)
    para = tmp_path / "p.txt"
    para.write_bytes(b"ok\nstill ok\n\nfine\nbroken \xc3\x28 here\n")
    with pytest.raises(DataError, match=r"p\.txt:5: invalid UTF-8"):
        _run(tmp_path, [para], tokenizer_dir, spec={"paragraphs": True})
    table = tmp_path / "c.csv"
    table.write_bytes(b"id,text\n1,ok\n2,\n3\n4,\xff\n")
    with pytest.raises(DataError, match=r"c\.csv:3: empty document"):
        _run(tmp_path, [table], tokenizer_dir)
    _, stats = _run(tmp_path, [table], tokenizer_dir, "skipped", skip_bad_lines=True)
    assert stats.documents == 1
    assert dict(stats.skipped) == {"empty-document": 1, "missing-key": 1, "invalid-utf8": 1}
    nocol = tmp_path / "n.csv"
    nocol.write_text("id,body\n1,x\n")
    with pytest.raises(DataError, match=r"n\.csv:1: csv header has no column 'text'"):
        _run(tmp_path, [nocol], tokenizer_dir)


def test_first_bad_line_in_file_order_is_reported_with_many_workers(tmp_path, tokenizer_dir):
    lines = [json.dumps({"text": f"文档{i}"}, ensure_ascii=False) for i in range(200)]
    lines[57] = "{broken"
    lines[150] = "{also broken"
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"in\.jsonl:58: malformed JSON"):
        _run(tmp_path, [src], tokenizer_dir, workers=2, chunk_docs=10)


def test_all_records_bad_is_an_error(tmp_path, tokenizer_dir):
    src = tmp_path / "in.jsonl"
    src.write_text('{"x": 1}\n{"x": 2}\n')
    with pytest.raises(DataError, match="no documents to write"):
        _run(tmp_path, [src], tokenizer_dir, skip_bad_lines=True)


def test_existing_output_needs_overwrite(tmp_path, tokenizer_dir, data):
    src = _jsonl(tmp_path / "in.jsonl", ["新的内容"])
    data.write_dataset(tmp_path / "out", [[1, 2, 3]])
    with pytest.raises(DataError, match="--overwrite"):
        _run(tmp_path, [src], tokenizer_dir)
    prefix, _ = _run(tmp_path, [src], tokenizer_dir, overwrite=True)
    assert len(_docs(prefix)) == 1 and _docs(prefix)[0] != [1, 2, 3]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize(("workers", "method"), [(1, "add_documents"), (2, "append_shard")])
def test_interrupt_mid_write_leaves_no_dataset(
    tmp_path, tokenizer_dir, wiki_texts, monkeypatch, interrupt, data, workers, method
):
    src = _jsonl(tmp_path / "in.jsonl", wiki_texts[:50])
    old = data.write_dataset(tmp_path / "out", [[7, 7, 7]])
    before = Path(old + ".idx").read_bytes()
    calls = {"n": 0}
    original = getattr(indexed_module.IndexedDatasetWriter, method)

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise interrupt()
        return original(self, *args)

    monkeypatch.setattr(indexed_module.IndexedDatasetWriter, method, flaky)
    with pytest.raises(interrupt):
        _run(
            tmp_path,
            [src],
            tokenizer_dir,
            workers=workers,
            chunk_docs=5,
            range_bytes=4096,
            overwrite=True,
        )
    assert calls["n"] == 3
    # The previous dataset is untouched and no temporary file is left behind.
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.bin", "out.idx"]
    assert Path(old + ".idx").read_bytes() == before


def _die(chunk):
    os._exit(3)  # a worker killed by the OOM killer looks like this to the pool


def test_dead_worker_is_an_error_not_a_hang(tmp_path, tokenizer_dir, monkeypatch):
    src = _jsonl(tmp_path / "in.jsonl", ["一", "二", "三"])
    monkeypatch.setattr(preprocess_module, "_process_chunk", _die)
    with pytest.raises(DataError, match="worker died"):
        _run(tmp_path, [src], tokenizer_dir, workers=2, chunk_docs=1)
    assert os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.slow
def test_killed_process_leaves_no_dataset_that_looks_complete(tmp_path, tokenizer_dir, data):
    texts = data.read_texts(data.WIKI, 400)
    src = _jsonl(tmp_path / "in.jsonl", texts * 20)
    prefix = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "megagpt.data.cli",
        "preprocess",
        "--input",
        src,
        "--tokenizer",
        str(tokenizer_dir),
        "--output-prefix",
        str(prefix),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not [n for n in os.listdir(tmp_path) if ".tmp." in n]:
        assert time.monotonic() < deadline and proc.poll() is None, "writer never started"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup code runs
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    left = os.listdir(tmp_path)
    assert "out.idx" not in left and "out.bin" not in left
    with pytest.raises(DataError):
        IndexedDataset(str(prefix))


def test_other_tokenizer_families_preprocess_with_their_eod(tmp_path, data, shared_data):
    from megagpt.data import build_tokenizer

    src = _jsonl(tmp_path / "in.jsonl", ["中文文本。", "第二 段\n落"])
    for path in (data.BERT_VOCAB, data.CPM_MODEL):
        tok = build_tokenizer(str(path))
        prefix, stats = _run(tmp_path, [src], path, name=path.stem, append_eod=True)
        docs = ["中文文本。", "第二 段\n落"]
        assert _docs(prefix) == [tok.start(tok.encode(t)) + [tok.eod] for t in docs]
        assert stats.dtype == "uint16"
    # The BERT family's documents read [CLS] text [SEP], as ModelScope's base/large models do.
    bert = _docs(str(tmp_path / data.BERT_VOCAB.stem))
    assert [d[0] for d in bert] == [101, 101] and [d[-1] for d in bert] == [102, 102]


def test_progress_bar_reports_docs_and_tokens_per_second(tmp_path, tokenizer_dir, capsys):
    src = _jsonl(tmp_path / "in.jsonl", ["一", "二", "三"])
    _run(tmp_path, [src], tokenizer_dir, progress=True)
    err = capsys.readouterr().err
    assert "docs/s" in err and "tokens/s" in err


# --- CLI ----------------------------------------------------------------------------------


def test_cli_preprocess_prints_summary(tmp_path, tokenizer_dir, capsys):
    src = _jsonl(tmp_path / "in.jsonl", ["中文", "文本"], key="content")
    code = main(
        [
            "preprocess",
            "--input",
            src,
            "--json-key",
            "content",
            "--tokenizer",
            str(tokenizer_dir),
            "--output-prefix",
            str(tmp_path / "o"),
            "--workers",
            "2",
            "--append-eod",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "documents 2" in out and "skipped 0" in out and "tokens/s" in out
    assert IndexedDataset(str(tmp_path / "o")).num_documents == 2


def test_cli_bad_input_exits_2_with_file_line_and_no_traceback(tmp_path, tokenizer_dir, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "好"}\n{"text": \n')
    argv = [
        "preprocess",
        "--input",
        str(src),
        "--tokenizer",
        str(tokenizer_dir),
        "--output-prefix",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert f"{src}:2: malformed JSON" in err and "Traceback" not in err
    code = main([*argv, "--skip-bad-lines"])
    captured = capsys.readouterr()
    assert code == 0 and "skipped 1 (malformed-json: 1)" in captured.out
    assert f"skipped {src}:2: malformed JSON" in captured.err


def test_cli_unknown_suffix_asks_for_input_format(tmp_path, tokenizer, tokenizer_dir, capsys):
    src = tmp_path / "data.dat"
    src.write_text("一行\n")
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(src),
                "--tokenizer",
                str(tokenizer_dir),
                "--output-prefix",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--input-format" in capsys.readouterr().err
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(src),
                "--input-format",
                "text",
                "--tokenizer",
                str(tokenizer_dir),
                "--output-prefix",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.asarray(IndexedDataset(str(tmp_path / "o"))[0]).tolist() == tokenizer.encode("一行")


def test_output_folder_is_created(tmp_path):
    """`--output-prefix new/dir/name` creates the folder, like `mkdir -p`."""
    from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter

    prefix = tmp_path / "new" / "deeper" / "ds"
    w = IndexedDatasetWriter(str(prefix), "uint16")
    w.add_document([1, 2, 3])
    w.finalize()
    assert IndexedDataset(str(prefix))[0].tolist() == [1, 2, 3]
