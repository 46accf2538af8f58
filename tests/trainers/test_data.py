"""Data: the shipped corpus, local files with column mapping, seeded splits, caps, errors."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.conftest import data_cfg
from trainers.data import DataError, batches, load_splits, shard, split_indices


def _rows(n=60):
    return pd.DataFrame(
        {
            "review": [f"review number {i} {'great' if i % 3 else 'awful'}" for i in range(n)],
            "sentiment": ["pos" if i % 3 else "neg" for i in range(n)],
            "other": range(n),
        }
    )


def test_rotten_tomatoes_corpus():
    s = load_splits(data_cfg(), seed=0)
    assert 12_600 <= s.source_rows <= 12_900  # fresh/rotten only, duplicate texts dropped
    assert s.label_names == ["rotten", "fresh"]
    all_texts = s.train.texts + s.validation.texts + s.test.texts
    assert len(all_texts) == s.source_rows == len(set(all_texts))
    assert len(s.validation) == round(0.1 * s.source_rows)
    # fresh is the majority class (about 58%)
    assert 0.55 < s.majority_baseline() < 0.62


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_local_files_with_column_mapping(tmp_path, fmt):
    frame = _rows()
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    s = load_splits(
        data_cfg(source=fmt, path=str(path), text_column="review", label_column="sentiment"), seed=1
    )
    assert s.label_names == ["neg", "pos"]
    assert len(s.train) + len(s.validation) + len(s.test) == 60
    for text, label in zip(s.train.texts, s.train.labels, strict=True):
        assert ("great" in text) == (label == 1)


def test_label_names_fix_the_order(tmp_path):
    path = tmp_path / "d.csv"
    _rows().to_csv(path, index=False)
    s = load_splits(
        data_cfg(
            source="csv",
            path=str(path),
            text_column="review",
            label_column="sentiment",
            label_names=["pos", "neg"],
        ),
        seed=0,
    )
    assert s.label_names == ["pos", "neg"]
    assert all(
        (lab == 0) == ("great" in t) for t, lab in zip(s.train.texts, s.train.labels, strict=True)
    )


def test_split_is_deterministic_by_seed():
    a = load_splits(data_cfg(max_train_samples=50), seed=3)
    b = load_splits(data_cfg(max_train_samples=50), seed=3)
    c = load_splits(data_cfg(max_train_samples=50), seed=4)
    assert a.train.texts == b.train.texts and a.validation.texts == b.validation.texts
    assert a.validation.texts != c.validation.texts
    train, val, test = split_indices(100, 0, 0.2, 0.1)
    assert len(train) == 70 and len(val) == 20 and len(test) == 10
    assert set(train) | set(val) | set(test) == set(range(100))


def test_caps_do_not_move_rows_between_splits():
    full = load_splits(data_cfg(), seed=0)
    capped = load_splits(
        data_cfg(max_train_samples=100, max_eval_samples=30, max_test_samples=20), seed=0
    )
    assert (len(capped.train), len(capped.validation), len(capped.test)) == (100, 30, 20)
    assert capped.train.texts == full.train.texts[:100]
    assert capped.validation.texts == full.validation.texts[:30]
    assert not set(capped.train.texts) & set(full.validation.texts)


def test_missing_column_names_the_key(tmp_path):
    path = tmp_path / "d.csv"
    _rows().to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_splits(
            data_cfg(source="csv", path=str(path), text_column="text", label_column="sentiment"),
            seed=0,
        )
    assert info.value.key == "data.text_column"
    assert "review" in str(info.value)  # lists the columns that exist
    with pytest.raises(DataError) as info:
        load_splits(
            data_cfg(source="csv", path=str(path), text_column="review", label_column="stars"),
            seed=0,
        )
    assert info.value.key == "data.label_column"


@pytest.mark.parametrize("content", ["", "review,sentiment\n"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_splits(
            data_cfg(source="csv", path=str(path), text_column="review", label_column="sentiment"),
            seed=0,
        )
    assert info.value.key == "data.path"
    assert "empty" in str(info.value) or "no rows" in str(info.value)


def test_single_label_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 1, 1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        load_splits(data_cfg(source="csv", path=str(path)), seed=0)


def test_shards_are_disjoint_and_equal():
    parts = [shard(range(10), r, 3, equal=True) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert not set(parts[0]) & set(parts[1])
    assert sum(len(shard(range(10), r, 3, equal=False)) for r in range(3)) == 10


def test_batches_pad_to_the_longest_row():
    ids = [[1, 2, 3], [4], [5, 6]]
    (batch,) = list(batches(ids, [0, 1, 0], [0, 1, 2], 8, pad_id=0))
    assert batch["input_ids"].shape == (3, 3)
    assert batch["attention_mask"].sum().item() == 6
    assert batch["input_ids"][1].tolist() == [4, 0, 0]


def test_an_epochs_batches_hold_every_row_once_with_less_padding_when_grouped():
    """group_by_length (transformers' get_length_grouped_indices): the same rows, the same
    order for the same seed and epoch (every rank), a new order next epoch, less padding."""
    import random

    from tests.conftest import worker_config
    from trainers.config import HParams
    from trainers.loop import WorkerData, epoch_micro_batches
    from trainers.tasks import Rows

    rng = random.Random(0)
    ids = [[7] * rng.randint(5, 60) for _ in range(640)]
    data = WorkerData(Rows(ids, list(range(640))), Rows([], []), 640, ["a", "b"], 0)
    hp = {**worker_config(None)["hp"], "per_device_train_batch_size": 16}

    def epoch(grouped, seed=0, n=0):
        h = HParams.from_dict({**hp, "group_by_length": grouped})
        return epoch_micro_batches(data, h, seed, n)

    def rows(batches):
        return [int(r) for b in batches for r in b["labels"]]  # the label is the row index

    def padded(batches):
        return sum(b["input_ids"].numel() for b in batches)

    grouped = epoch(True)
    assert sorted(rows(grouped)) == list(range(640))
    assert rows(epoch(True)) == rows(grouped)  # same seed and epoch: same order
    assert rows(epoch(True, n=1)) != rows(grouped)
    assert padded(grouped) < 0.8 * padded(epoch(False))


def test_users_own_validation_and_test_files_are_used_as_given(tmp_path):
    """A train file plus validation and test files: nothing is re-split or moved."""
    from tests.conftest import data_cfg
    from trainers.data import load_splits

    rows = [(f"text number {i}", "pos" if i % 3 else "neg") for i in range(60)]
    for name, part in (("train", rows[:40]), ("val", rows[40:50]), ("test", rows[50:])):
        lines = ["text,label", *[f"{t},{y}" for t, y in part]]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    cfg = data_cfg(
        source="csv",
        path=str(tmp_path / "train.csv"),
        validation_path=str(tmp_path / "val.csv"),
        test_path=str(tmp_path / "test.csv"),
    )
    a, b = load_splits(cfg, seed=0), load_splits(cfg, seed=7)
    assert a.validation.texts == [t for t, _ in rows[40:50]]  # in file order, all of them
    assert a.test.texts == [t for t, _ in rows[50:]]
    assert sorted(a.train.texts) == sorted(t for t, _ in rows[:40])  # the whole train file
    assert a.validation.texts == b.validation.texts  # the seed moves nothing
    assert a.label_names == ["neg", "pos"] and a.source_rows == 60
    # only the test file given: validation is cut from the train file, the test file as given
    only_test = load_splits(
        data_cfg(
            source="csv", path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv")
        ),
        seed=0,
    )
    assert only_test.test.texts == [t for t, _ in rows[50:]]
    assert len(only_test.validation) == 4 and len(only_test.train) == 36


def test_own_split_files_are_checked_in_the_spec(tmp_path):
    import pytest

    from tune_jobs.spec import SpecError, parse_spec

    with pytest.raises(SpecError) as err:
        parse_spec(
            {
                "data": {
                    "source": "rotten_tomatoes",
                    "validation_path": str(tmp_path / "missing.csv"),
                    "hub_test_split": "test",
                }
            }
        )
    text = str(err.value)
    assert "data.validation_path" in text and "only for csv / jsonl / parquet" in text
    assert "data.hub_test_split" in text and "only for source 'hub'" in text


def test_promotion_rows_are_chosen_by_text_and_stay_put_as_data_grows(tmp_path):
    """The hash-stable promotion set: the same rows (by id) in yesterday's and today's data,
    and never in train, validation or test."""
    from tests.conftest import data_cfg
    from trainers.data import example_id, load_splits

    rows = [(f"review {i} " + "word " * (i % 7), "pos" if i % 2 else "neg") for i in range(400)]

    def write(name, part):
        lines = ["text,label", *[f"{t},{y}" for t, y in part]]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return data_cfg(source="csv", path=str(tmp_path / name), promotion_fraction=0.2)

    day1 = load_splits(write("day1.csv", rows[:300]), seed=0)
    day2 = load_splits(write("day2.csv", rows[::-1]), seed=1)  # more rows, other order, other seed
    ids1 = {example_id(t) for t in day1.promotion.texts}
    ids2 = {example_id(t) for t in day2.promotion.texts}
    assert 40 <= len(ids1) <= 80  # about a fifth of 300
    assert ids1 <= ids2  # every row promoted-on yesterday is in today's set too
    assert ids2 - ids1 == {
        example_id(t) for t in day2.promotion.texts if t in {r for r, _ in rows[300:]}
    }
    for splits in (day1, day2):
        used = set(splits.train.texts) | set(splits.validation.texts) | set(splits.test.texts)
        assert not used & set(splits.promotion.texts)
        assert splits.source_rows == len(used) + len(splits.promotion)
