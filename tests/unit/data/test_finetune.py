"""Fine-tuning samples: columns, loss masks of both modes, epochs, file errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megagpt.data.errors import DataError
from megagpt.data.tokenizer import Tokenizer
from megagpt.data.finetune import (
    build_finetune_dataset,
    encode_sample,
    epoch_permutation,
    global_sample_indices,
    read_records,
)

SEP, PAD = 2, 0


def test_continuation_mask_covers_source_after_first_token_and_the_sep():
    ids, mask = encode_sample([11, 12, 13, 14], None, SEP, PAD, seq_length=8)
    assert ids.tolist() == [11, 12, 13, 14, SEP, PAD, PAD, PAD, PAD]
    labels = ids[1:]
    assert mask.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert labels[mask == 1].tolist() == [12, 13, 14, SEP]  # never a pad


def test_src_tgt_mask_covers_only_target_and_sep():
    ids, mask = encode_sample([11, 12, 13], [21, 22], SEP, PAD, seq_length=8)
    assert ids.tolist() == [11, 12, 13, 21, 22, SEP, PAD, PAD, PAD]
    assert mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert ids[1:][mask == 1].tolist() == [21, 22, SEP]


def test_truncation_keeps_shapes_and_drops_the_sep():
    ids, mask = encode_sample(list(range(10, 20)), None, SEP, PAD, seq_length=6)
    assert ids.tolist() == list(range(10, 17)) and mask.tolist() == [1] * 6
    ids, mask = encode_sample([5, 6, 7], list(range(30, 40)), SEP, PAD, seq_length=6)
    assert ids.tolist() == [5, 6, 7, 30, 31, 32, 33]
    assert ids[1:][mask == 1].tolist() == [30, 31, 32, 33]
    # A source that fills the sample leaves nothing to learn from it.
    _, mask = encode_sample(list(range(10, 20)), [1, 2], SEP, PAD, seq_length=6)
    assert mask.sum() == 0


def _tokenizer(bos=None):
    class Tok(Tokenizer):  # one id per character (10 + code point); <sep>=2, pad=0, eod=1
        path, sep, pad, eod, vocab_size = "fake", SEP, PAD, 1, 0x30000

        def encode(self, text):
            return [10 + ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i - 10) for i in ids if i >= 10)

        def _content(self):
            return []

    tok = Tok()
    tok.bos = bos
    return tok


def test_jsonl_with_renamed_column_is_continuation(tmp_path):
    path = tmp_path / "poems.jsonl"
    rows = [{"id": 1, "text1": "白日依山尽"}, {"id": 2, "text1": "黄河入海流"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    ds = build_finetune_dataset(str(path), _tokenizer(), 8, src_column="text1")
    assert not ds.paired and len(ds) == 2
    assert ds.ids.shape == (2, 9) and ds.loss_mask.shape == (2, 8)
    assert ds.loss_mask.sum(axis=1).tolist() == [5, 5]  # 4 characters after the first + <sep>
    with pytest.raises(DataError, match=r"poems.jsonl:1: no column 'src_txt'"):
        build_finetune_dataset(str(path), _tokenizer(), 8)


def test_a_family_with_bos_starts_every_source_with_it(tmp_path):
    # The BERT family's samples read [CLS] src [SEP] (ModelScope's base/large preprocessor):
    # the first source character is then predicted, from [CLS].
    path = tmp_path / "poems.jsonl"
    path.write_text(json.dumps({"src_txt": "白日", "tgt_txt": "尽"}) + "\n", "utf-8")
    first, second, target = _tokenizer().encode("白日尽")
    cont = build_finetune_dataset(str(path), _tokenizer(bos=3), 6, mode="continuation")
    assert cont.ids[0].tolist() == [3, first, second, SEP, PAD, PAD, PAD]
    assert cont.ids[0][1:][cont.loss_mask[0] == 1].tolist() == [first, second, SEP]
    paired = build_finetune_dataset(str(path), _tokenizer(bos=3), 6)
    assert paired.ids[0].tolist() == [3, first, second, target, SEP, PAD, PAD]
    assert paired.ids[0][1:][paired.loss_mask[0] == 1].tolist() == [target, SEP]
    assert paired.sources == [[3, first, second]]  # the prompts of generation-based evaluation


def test_csv_with_source_and_target_columns(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\n北京在哪,中国\n上海,东部\n", encoding="utf-8")
    ds = build_finetune_dataset(
        str(path), _tokenizer(), 8, src_column="question", tgt_column="answer"
    )
    assert ds.paired and ds.targets == ["中国", "东部"]
    assert ds.loss_mask.sum(axis=1).tolist() == [3, 3]  # two target tokens + <sep>
    cont = build_finetune_dataset(
        str(path), _tokenizer(), 8, src_column="question", tgt_column="answer", mode="continuation"
    )
    assert not cont.paired
    # Continuation trains on the question alone: every label that is not padding counts, the
    # answer is not in the sample.
    tok = _tokenizer()
    assert cont.ids[:, 1:].tolist() == [
        tok.encode("京在哪") + [SEP] + [PAD] * 4,
        tok.encode("海") + [SEP] + [PAD] * 6,
    ]
    assert cont.loss_mask.tolist() == (cont.ids[:, 1:] != PAD).astype(int).tolist()
    assert cont.loss_mask.sum(axis=1).tolist() == [4, 2]  # characters after the first + <sep>


def test_bad_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src_txt": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(str(bad))
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown data format"):
        (tmp_path / "x.txt").write_text("a")
        read_records(str(tmp_path / "x.txt"))


def test_epochs_visit_every_sample_once_and_reshuffle():
    n, per_epoch = 10, 8  # whole global batches of 4: 2 per epoch, 2 samples wait
    first = global_sample_indices(0, per_epoch, n, per_epoch, seed=1)
    second = global_sample_indices(per_epoch, per_epoch, n, per_epoch, seed=1)
    assert len(set(first)) == per_epoch and len(set(second)) == per_epoch
    assert first != second
    assert first == epoch_permutation(n, 0, 1)[:per_epoch].tolist()
    assert global_sample_indices(0, 4, n, per_epoch, 1, shuffle=False) == [0, 1, 2, 3]
    # A pure function of the position: resuming at sample 12 sees what a straight run sees.
    assert global_sample_indices(12, 3, n, per_epoch, 1) == second[4:7]
    assert isinstance(epoch_permutation(n, 0, 1), np.ndarray)
