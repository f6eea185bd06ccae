"""Tests of reading text files for SeqIO: errors that name the file, bad UTF-8, long documents."""

import gzip
import logging
import random

import pytest
import seqio

from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES, BUNDLED_VALIDATION_FILES
from e2s2_jax.data.text_source import (
    TextReadStats,
    expand_file_patterns,
    read_text_documents,
    split_long_document,
    text_files_data_source,
)


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def texts(dataset) -> list[bytes]:
    return [example["text"] for example in dataset.as_numpy_iterator()]


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-*.txt")
    with pytest.raises(FileNotFoundError, match="nothing-\\*.txt.*matches no file"):
        expand_file_patterns(pattern)
    with pytest.raises(FileNotFoundError, match="split 'train'.*matches no file"):
        text_files_data_source({"train": [pattern]})


def test_directory_is_refused_with_a_fix(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(IsADirectoryError, match="sub.*is a directory.*\\*.txt"):
        expand_file_patterns(str(tmp_path / "sub"))


def test_glob_sorted_within_pattern_and_deduplicated(tmp_path):
    b = write(tmp_path / "b.txt", b"bee\n")
    a = write(tmp_path / "a.txt", b"ay\n")
    assert expand_file_patterns([str(tmp_path / "*.txt"), a]) == [a, b]


def test_empty_file_fails_naming_it(tmp_path):
    good = write(tmp_path / "good.txt", b"one\n")
    empty = write(tmp_path / "empty.txt", b"")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        list(read_text_documents([good, empty]))
    with pytest.raises(ValueError, match="split 'validation'.*empty.txt is empty"):
        text_files_data_source({"train": good, "validation": empty})


def test_file_without_documents_fails(tmp_path):
    blank = write(tmp_path / "blank.txt", b"\n  \n\t\n")
    with pytest.raises(ValueError, match="blank.txt has no documents \\(3 blank lines"):
        list(read_text_documents(blank))


def test_lines_gzip_crlf_bom_and_unicode_separators(tmp_path):
    text = "\ufeffFirst doc.\r\n\n  Second\u2028still second.  \nThird\n".encode()
    plain = write(tmp_path / "docs.txt", text)
    zipped = write(tmp_path / "docs.txt.gz", gzip.compress(text))
    expected = ["First doc.", "Second\u2028still second.", "Third"]
    assert list(read_text_documents(plain)) == expected
    stats = TextReadStats()
    assert list(read_text_documents(zipped, stats=stats)) == expected
    assert (stats.files, stats.documents, stats.blank_lines) == (1, 3, 1)


BAD_UTF8 = b"good one\n\xff\xfe latin junk\ngood two\ncaf\xc3\nr\xc3\xa9sum\xc3\xa9\n"


def test_bad_utf8_lines_are_skipped_counted_and_logged(tmp_path, caplog):
    path = write(tmp_path / "mixed.txt", BAD_UTF8)
    stats = TextReadStats()
    with caplog.at_level(logging.WARNING):
        documents = list(read_text_documents(path, stats=stats))
    assert documents == ["good one", "good two", "résumé"]
    assert stats.bad_utf8_lines == 2
    assert "mixed.txt: skipped 2 lines that are not UTF-8 (the first is line 2)" in caplog.text


def test_bad_utf8_fail_mode_names_file_and_line(tmp_path):
    path = write(tmp_path / "mixed.txt", BAD_UTF8)
    with pytest.raises(ValueError, match="mixed.txt:2: line is not UTF-8"):
        list(read_text_documents(path, on_bad_utf8="fail"))
    with pytest.raises(ValueError, match="on_bad_utf8='ignore'"):
        list(read_text_documents(path, on_bad_utf8="ignore"))


def check_pieces(text: str, pieces: list[str], max_chars: int) -> None:
    assert all(0 < len(piece) <= max_chars for piece in pieces)
    assert all(piece == piece.strip() for piece in pieces)
    # Nothing but whitespace at the cuts is lost: the non-whitespace characters are all there.
    assert "".join("".join(pieces).split()) == "".join(text.split())


def test_split_long_document_loses_no_characters():
    rng = random.Random(0)
    alphabet = "abcdefghij.,'é" + "      \t\n\u3000"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
        max_chars = rng.randrange(1, 40)
        pieces = split_long_document(text, max_chars)
        check_pieces(text, pieces, max_chars)
        if all(len(word) <= max_chars for word in text.split()):
            # Every word fits, so cuts fall only on whitespace: the word sequence is unchanged.
            assert " ".join(pieces).split() == text.split()


def test_split_long_document_cuts_at_the_last_whitespace_and_inside_overlong_words():
    assert split_long_document("aaa bbb ccc", 7) == ["aaa bbb", "ccc"]
    assert split_long_document("aaa bbb ccc", 6) == ["aaa", "bbb", "ccc"]
    assert split_long_document("x" * 25 + " y", 10) == ["x" * 10, "x" * 10, "xxxxx y"]
    assert split_long_document("short", 10) == ["short"]


def test_long_documents_are_split_never_dropped(tmp_path):
    words = [f"w{i}" for i in range(300)]
    path = write(tmp_path / "long.txt", (" ".join(words) + "\nshort doc\n").encode())
    stats = TextReadStats()
    documents = list(read_text_documents(path, max_chars_per_document=50, stats=stats))
    assert documents[-1] == "short doc"
    assert " ".join(documents[:-1]).split() == words
    assert stats.split_documents == 1 and stats.documents == len(documents)


def test_data_source_yields_the_documents_as_text_features(tmp_path):
    a = write(tmp_path / "a.txt", b"alpha one\nalpha two\n")
    b = write(tmp_path / "b.txt.gz", gzip.compress(b"beta one\n\xff bad\nbeta two words\n"))
    source = text_files_data_source(
        {"train": [str(tmp_path / "*")], "validation": a}, max_chars_per_document=8
    )
    assert isinstance(source, seqio.DataSource)
    assert set(source.splits) == {"train", "validation"}
    assert source.list_shards("train") == [a, b]
    got = [text.decode() for text in texts(source.get_dataset("train", shuffle=False))]
    assert got == list(read_text_documents([a, b], max_chars_per_document=8))
    assert sorted(got) == ["alpha", "alpha", "beta one", "beta two", "one", "two", "words"]
    assert source.stats.bad_utf8_lines == 1 and source.stats.split_documents == 3
    # Two files, two hosts: each reads one file, together everything once.
    shards = [
        texts(source.get_dataset("train", False, shard_info=seqio.ShardInfo(i, num_shards=2)))
        for i in range(2)
    ]
    assert sorted(shards[0] + shards[1]) == sorted(ex.encode() for ex in got)
    with pytest.raises(ValueError, match="split 'test' is not in this source"):
        source.list_shards("test")


def test_data_source_fail_mode_raises_when_read(tmp_path):
    path = write(tmp_path / "mixed.txt", BAD_UTF8)
    source = text_files_data_source({"train": path}, on_bad_utf8="fail")
    with pytest.raises(Exception, match="mixed.txt:2: line is not UTF-8"):
        texts(source.get_dataset("train", shuffle=False))


def test_bundled_corpus_through_the_source():
    source = text_files_data_source(
        {"train": BUNDLED_TRAIN_FILES, "validation": BUNDLED_VALIDATION_FILES}
    )
    validation = texts(source.get_dataset("validation", shuffle=False))
    with gzip.open(BUNDLED_VALIDATION_FILES[0], "rt", encoding="utf-8") as f:
        assert [line.rstrip("\n").encode() for line in f] == validation
    assert len(validation) == 385
    with gzip.open(BUNDLED_TRAIN_FILES[0], "rt", encoding="utf-8") as f:
        train_lines = set(f)
    assert not train_lines & {line.decode() + "\n" for line in validation}


def test_stats_count_a_partial_read(tmp_path):
    path = write(tmp_path / "docs.txt", b"one\n\ntwo\nthree\n")
    stats = TextReadStats()
    documents = read_text_documents(path, stats=stats)
    assert [next(documents), next(documents)] == ["one", "two"]
    documents.close()
    assert (stats.files, stats.documents, stats.blank_lines) == (1, 2, 1)
