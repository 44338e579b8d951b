"""Class removal sets and files of known poisoned training indices."""

import json

import numpy as np
import pytest
import torch

from gifcli.data import (
    TensorSplit,
    class_removal_indices,
    read_poison_indices,
    read_removal_indices,
    seeded_subset,
    to_split_positions,
)
from gifcli.errors import GifError


def test_class_removal_indices():
    train = TensorSplit(torch.zeros(8, 1, 2, 2), torch.tensor([0, 1, 2, 3, 1, 0, 3, 2]))
    removal, retained = class_removal_indices(train, [1, 3])
    assert removal.tolist() == [1, 3, 4, 6] and retained.tolist() == [0, 2, 5, 7]
    assert removal.dtype == torch.int64
    with pytest.raises(GifError, match="removal.classes: class 5 has no samples"):
        class_removal_indices(train, [1, 5])


def test_txt_with_comments_labels_and_order(tmp_path):
    path = tmp_path / "poison.txt"
    path.write_text(
        "# poisoned samples: index, true label\n\n7 3\n  2 1  # trailing comment\n5\t0\n"
    )
    indices, labels = read_poison_indices(path, 10)
    assert indices.tolist() == [2, 5, 7] and labels.tolist() == [1, 0, 3]
    assert indices.dtype == labels.dtype == torch.int64


def test_txt_without_labels(tmp_path):
    path = tmp_path / "poison.txt"
    path.write_text("4\n0\n")
    indices, labels = read_poison_indices(path, 5)
    assert indices.tolist() == [0, 4] and labels is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\n2\n9\n", "line 3: index 9 is out of range 0..4"),
        ("1\n\n# c\n1\n", "line 4: index 1 is repeated .first at line 1"),
        ("1\nx\n", "line 2: 'x' is not an integer"),
        ("1 2 3\n", "line 1: expected an index and an optional true label"),
        ("1 0\n2\n", "line 2: has no true label but line 1 has one"),
        ("1\n2 0\n", "line 2: has a true label but line 1 has none"),
        ("1 -1\n", "line 1: true label -1 is out of range"),
        ("# only comments\n\n", "lists no indices"),
    ],
)
def test_txt_errors(tmp_path, text, message):
    path = tmp_path / "poison.txt"
    path.write_text(text)
    with pytest.raises(GifError, match=message) as info:
        read_poison_indices(path, 5)
    assert str(path) in str(info.value)


def test_label_bound_with_num_classes(tmp_path):
    path = tmp_path / "poison.txt"
    path.write_text("1 10\n")
    with pytest.raises(GifError, match=r"true label 10 is out of range \(0..9\)"):
        read_poison_indices(path, 5, num_classes=10)


def test_npy_formats_and_errors(tmp_path):
    flat = tmp_path / "flat.npy"
    np.save(flat, np.array([3, 1], dtype=np.int32))
    indices, labels = read_poison_indices(flat, 4)
    assert indices.tolist() == [1, 3] and labels is None
    pairs = tmp_path / "pairs.npy"
    np.save(pairs, np.array([[3, 0], [1, 2]]))
    indices, labels = read_poison_indices(pairs, 4)
    assert indices.tolist() == [1, 3] and labels.tolist() == [2, 0]
    np.save(flat, np.array([0.0, 1.0]))
    with pytest.raises(GifError, match="flat.npy: holds float64 values"):
        read_poison_indices(flat, 4)
    np.save(flat, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(GifError, match=r"flat.npy: array has shape \(2, 3\)"):
        read_poison_indices(flat, 4)
    np.save(flat, np.array([0, 2, 2]))
    with pytest.raises(GifError, match="flat.npy: entry 2: index 2 is repeated"):
        read_poison_indices(flat, 4)
    np.save(pairs, np.array([[0, 1], [7, 1]]))
    with pytest.raises(GifError, match="pairs.npy: row 1: index 7 is out of range"):
        read_poison_indices(pairs, 4)


def test_json_formats_and_errors(tmp_path):
    path = tmp_path / "poison.json"
    path.write_text(json.dumps([2, 0]))
    indices, labels = read_poison_indices(path, 3)
    assert indices.tolist() == [0, 2] and labels is None
    path.write_text(json.dumps({"indices": [2, 0], "true_labels": [5, 6]}))
    indices, labels = read_poison_indices(path, 3)
    assert indices.tolist() == [0, 2] and labels.tolist() == [6, 5]
    for content, message in [
        ("[1, true]", "entry 1: True is not an integer"),
        ('{"indices": [1], "true_labels": [1, 2]}', "1 indices but 2 true_labels"),
        ('{"indices": [1, 1.5]}', r"indices\[1\]: 1.5 is not an integer"),
        ('{"index": [1]}', "expected a list of indices"),
        ('{"indices": [1], "labels": [0]}', "unknown key 'labels'"),
        ("[1,\n 2", "line 2: malformed JSON"),
        ("[4]", "entry 0: index 4 is out of range 0..2"),
        ("[" * 200_000 + "]" * 200_000, "JSON nested too deeply"),
        ("[1" + "0" * 5000 + "]", "cannot read the JSON .*digits"),
        ('["' + "x" * 10_000 + '"]', r"entry 0: 'xxx.*\.\.\. is not an integer$"),
    ]:
        path.write_text(content)
        with pytest.raises(GifError, match=message):
            read_poison_indices(path, 3 if len(content) < 1000 else 100_000)
    path.write_text(json.dumps(list(range(2000))))
    with pytest.raises(GifError, match="a JSON index file for a training set of 3 samples"):
        read_poison_indices(path, 3)


def test_file_errors(tmp_path):
    with pytest.raises(GifError, match="missing.txt: removal.poison_indices not found"):
        read_poison_indices(tmp_path / "missing.txt", 3)
    csv = tmp_path / "poison.csv"
    csv.write_text("1\n")
    with pytest.raises(GifError, match="not a .txt, .npy or .json file"):
        read_poison_indices(csv, 3)


def test_to_split_positions():
    train_source = torch.tensor([0, 2, 3, 5])  # 1 and 4 were held out for validation
    assert to_split_positions(torch.tensor([5, 1, 0, 3]), train_source).tolist() == [3, -1, 0, 2]
    assert to_split_positions(torch.tensor([], dtype=torch.long), train_source).tolist() == []


def test_an_index_file_larger_than_the_limit_is_refused(tmp_path, monkeypatch):
    from gifcli.data import removal

    monkeypatch.setattr(removal, "MAX_INDEX_FILE_BYTES", 8)
    path = tmp_path / "poison.txt"
    path.write_text("0\n1\n2\n3\n4\n")
    with pytest.raises(
        GifError, match="poison.txt: removal.poison_indices is 10 bytes; gif reads at most 8"
    ):
        read_poison_indices(path, 10)


def test_seeded_subset_is_sorted_seeded_and_all_when_the_size_reaches_the_count():
    subset = seeded_subset(100, 10, seed=3)
    assert len(subset) == 10 == len(set(subset.tolist())) and subset.dtype == torch.int64
    assert subset.tolist() == sorted(subset.tolist())
    assert torch.equal(subset, seeded_subset(100, 10, seed=3))
    assert not torch.equal(subset, seeded_subset(100, 10, seed=4))
    for size in (None, 100, 1000):
        assert torch.equal(seeded_subset(100, size, seed=3), torch.arange(100))


def test_removal_indices_in_every_format(tmp_path):
    txt, npy, js = tmp_path / "a.txt", tmp_path / "a.npy", tmp_path / "a.json"
    txt.write_text("# deletion request\n7\n\n  2  # trailing comment\n5\n")
    np.save(npy, np.array([7, 2, 5], dtype=np.int16))
    js.write_text(json.dumps({"indices": [7, 2, 5]}))
    for path in (txt, npy, js):
        indices = read_removal_indices(path, 8, key="removal.indices")
        assert indices.tolist() == [2, 5, 7] and indices.dtype == torch.int64, path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\n2\n9\n", "line 3: index 9 is out of range 0..4"),
        ("-1\n", "line 1: index -1 is out of range 0..4"),
        ("3\n\n1\n3\n", r"line 4: index 3 is repeated \(first at line 1\)"),
        ("1\n1.5\n", "line 2: '1.5' is not an integer index$"),
        ("1\nfour\n", "line 2: 'four' is not an integer index$"),
        ("1 2\n", "line 1: expected one index per line, got '1 2'"),
        ("", "lists no indices"),
        ("# nothing yet\n\n", "lists no indices"),
    ],
    ids=["out-of-range", "negative", "duplicate", "float", "word", "two-columns", "empty", "blank"],
)
def test_removal_index_errors_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "forget.txt"
    path.write_text(text)
    with pytest.raises(GifError, match=message) as info:
        read_removal_indices(path, 5, key="removal.indices")
    assert str(info.value).startswith(f"{path}: ")


def test_removal_index_files_take_no_label(tmp_path):
    pairs, js = tmp_path / "pairs.npy", tmp_path / "a.json"
    np.save(pairs, np.array([[3, 0], [1, 2]]))
    js.write_text(json.dumps({"indices": [1], "true_labels": [4]}))
    with pytest.raises(GifError, match="row 0: carries a second value"):
        read_removal_indices(pairs, 5, key="removal.indices")
    with pytest.raises(GifError, match=r"indices\[0\]: carries a second value"):
        read_removal_indices(js, 5, key="removal.indices")
    with pytest.raises(GifError, match="missing.txt: removal.indices not found"):
        read_removal_indices(tmp_path / "missing.txt", 5, key="removal.indices")
