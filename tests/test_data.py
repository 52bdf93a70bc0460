"""Data loading: GLUE TSV as is, other formats, columns, labels, bucketing, clear errors."""

import gzip
import json

import pandas as pd
import pytest

from kdship.data import bucket_batches, encode_labels, label_names_from_data, load_table
from kdship.errors import DataError


def test_glue_tsv_with_raw_quotes_loads_as_is(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nit \'s a "great" film \t1\n" odd quote start\t0\n')
    table = load_table(str(path), None, "label")
    assert table.texts == [('it \'s a "great" film ',), ('" odd quote start',)]
    assert table.raw_labels == ["1", "0"]
    assert table.fingerprint.startswith("sha256:")


def test_csv_jsonl_parquet_and_sentence_pairs(tmp_path):
    frame = pd.DataFrame({"sentence1": ["a b", "c d"], "sentence2": ["e", "f"], "label": [0, 1]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
    for name in ("d.csv", "d.parquet", "d.jsonl"):
        table = load_table(str(tmp_path / name), None, "label")
        assert table.texts == [("a b", "e"), ("c d", "f")]


def test_text_files_and_folders_for_mlm(tmp_path):
    (tmp_path / "a.txt").write_text("one line\n\ntwo line\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("three\n")
    assert [t[0] for t in load_table(str(tmp_path), None, None).texts] == ["one line", "two line", "three"]
    with pytest.raises(DataError, match="plain text without labels"):
        load_table(str(tmp_path / "a.txt"), None, "label")


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\n", "holds no examples"),
    ("words\tlabel\nhi\t1\n", "no text column I recognise"),
    ("sentence\ty\nhi\t1\n", "no label column 'label'"),
])
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "d.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_table(str(path), None, "label")


def test_missing_file_and_explicit_missing_column(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_table(str(tmp_path / "nope.tsv"), None, "label")
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\nhi\t1\n")
    with pytest.raises(DataError, match="no column 'text'"):
        load_table(str(path), ["text"], "label")


def test_labels_names_and_ids():
    assert label_names_from_data(["1", "0", "2"]) == ["0", "1", "2"]
    assert label_names_from_data(["pos", "neg"]) == ["neg", "pos"]
    assert encode_labels(["pos", "neg"], ["neg", "pos"], "x") == [1, 0]
    assert encode_labels(["1", 0, "1.0"], ["negative", "positive"], "x") == [1, 0, 1]  # ids into named labels
    with pytest.raises(DataError, match="label 'maybe'"):
        encode_labels(["maybe"], ["neg", "pos"], "x")


def test_bucket_batches_cover_everything_once_are_deterministic_and_group_lengths():
    lengths = [i % 17 for i in range(1000)]
    batches = bucket_batches(lengths, 32, seed=3, shuffle=True)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == bucket_batches(lengths, 32, seed=3, shuffle=True)
    assert batches != bucket_batches(lengths, 32, seed=4, shuffle=True)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 4  # random batches would span ~16
