"""TFDS builders over the installed offline sources: counts, shapes, splits, offline errors."""

import gzip
import re

import numpy as np
import pytest

from prism_jax.data import cloze, sources, splits, tfds_builders
from prism_jax.errors import PrismError


def test_fine_food_reviews(tfds_dir):
    b = tfds_builders.builder("fine_food_reviews", tfds_dir)
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 4000, "test": 1000}
    assert b.info.features["label"].names == ["other", "great"]
    assert (tfds_dir / "fine_food_reviews" / "1.0.0").is_dir()
    assert list((tfds_dir / "fine_food_reviews" / "1.0.0").glob("*.array_record*"))
    texts, labels = tfds_builders.texts("fine_food_reviews", "test", data_dir=tfds_dir)
    direct, direct_labels = sources.fine_food_reviews("test")
    assert len(texts) == 1000 and sorted(texts) == sorted(direct)
    assert labels.sum() == sum(direct_labels)


def test_fashion_mnist(tfds_dir):
    images, labels = tfds_builders.arrays("fashion_mnist_local", "test", data_dir=tfds_dir)
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    direct, direct_labels = sources.fashion_mnist("test")
    for c in (0, 9):  # the same images per class, whatever the order
        assert images[labels == c].sum() == direct[direct_labels == c].astype(np.int64).sum()
    b = tfds_builders.builder("fashion_mnist_local", tfds_dir)
    assert b.info.splits["train"].num_examples == 60000
    assert tfds_builders.records("fashion_mnist_local", "train", 3, tfds_dir)[0]["image"].shape == (
        28,
        28,
        1,
    )


def test_wikipedia_leads_split(tfds_dir):
    b = tfds_builders.builder("wikipedia_leads", tfds_dir)
    sizes = {k: v.num_examples for k, v in b.info.splits.items()}
    assert sum(sizes.values()) == 10033
    assert 0.04 < sizes["test"] / 10033 < 0.06 and 0.04 < sizes["validation"] / 10033 < 0.06
    titles = {
        split: {
            r["title"] for r in tfds_builders.records("wikipedia_leads", split, data_dir=tfds_dir)
        }
        for split in sizes
    }
    assert not titles["test"] & titles["train"] and not titles["validation"] & titles["train"]
    assert all(splits.wiki_split(t.decode()) == "test" for t in titles["test"])


def test_shakespeare(tfds_dir):
    texts, labels = tfds_builders.texts("shakespeare_texts", "train", data_dir=tfds_dir)
    assert len(texts) == 78 and labels is None
    assert sum(map(len, texts)) > 9_000_000
    assert any("To be, or not to be" in t for t in texts)


def test_wikipedia_cloze(tfds_dir):
    questions = tfds_builders.records("wikipedia_cloze", "test", data_dir=tfds_dir)
    assert len(questions) > 200
    for q in questions[:50]:
        options = [o.decode() for o in q["options"]]
        answer, question = q["answer"].decode(), q["question"].decode()
        assert len(options) == 10 == len(set(options)) and answer in options
        assert question.count(cloze.BLANK) == 1
        assert re.search(rf"\b{answer}\b", q["context"].decode())
        assert len(cloze.sentences([q["context"].decode()])) >= cloze.CONTEXT - 2


def test_cloze_construction():
    names = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory".split()
    nouns = "garden kitchen river forest castle market tower bridge harbour meadow valley".split()
    story = [f"{names[i % 11]} walked to the {nouns[i % 11]} today." for i in range(20)]
    story.append("Then the Queen shouted at Alice in the garden.")
    q, *rest = cloze.build(story, stride=100)
    assert not rest
    assert q["answer"] in {"Alice", "garden"} and q["answer"] in q["options"]
    assert q["question"] == "Then the Queen shouted at XXXXX in the garden." or q["question"] == (
        "Then the Queen shouted at Alice in the XXXXX."
    )
    kind = names if q["answer"] == "Alice" else [*nouns, "walked", "today"]  # same case
    assert len(q["options"]) == 10 and set(q["options"]) <= set(kind)


def test_catalogue_name_offline_is_one_clear_error(tfds_dir, monkeypatch):
    import socket

    def offline(*args, **kwargs):  # no network, at once (name lookups can hang for minutes)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS's 10 retries back off for 200 s
    with pytest.raises(PrismError, match="cifar10") as e:
        tfds_builders.builder("cifar10", tfds_dir)
    assert "\n" not in str(e.value)
    with pytest.raises(PrismError, match="unknown dataset"):
        tfds_builders.builder("no_such_dataset_here", tfds_dir)


def test_read_idx(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw + images.tobytes()))
    np.testing.assert_array_equal(sources.read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "bad").write_bytes(raw + images.tobytes()[:-1])
    with pytest.raises(PrismError, match="header says"):
        sources.read_idx(tmp_path / "bad")
    with pytest.raises(PrismError, match="not found"):
        sources.fashion_mnist("test", tmp_path)


def test_two_processes_prepare_one_dataset_once(tmp_path):
    """Two first-time preparations at once: both succeed and read the same records."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from prism_jax.data import tfds_builders as t; "
        "print(len(t.records('fine_food_reviews', 'test')))"
    )
    env = {"PATH": "/usr/bin:/bin", "TFDS_DATA_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).parents[1])}  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in results]
    assert [out.strip() for out, _ in results] == ["1000", "1000"]
