"""Rebuild the bundled corpus (data/corpus/: text and chapters) from Debian's r-cran-janeaustenr.

Usage (from the repository root; needs only the Python standard library and, without --deb,
`apt-get` on a Debian/Ubuntu machine):

    python scripts/build_corpus.py                      # apt-get download the package, rebuild
    python scripts/build_corpus.py --deb r-cran-janeaustenr_1.0.0-1_all.deb
    python scripts/build_corpus.py --check              # rebuild in memory, compare with data/

The package stores the six novels as R lazy-load data (data/Rdata.rdb + Rdata.rdx). This script
reads that format itself (a gzip'd index, zlib'd entries, R's XDR serialisation), so neither R nor
the PyPI `rdata` package is needed. See data/README.md for the split and the figures.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

PACKAGE = "r-cran-janeaustenr"
DATA_DIR_IN_PACKAGE = "usr/lib/R/site-library/janeaustenr/data"
# Book variables in publication order, with the titles used in data/README.md.
BOOKS = {
    "sensesensibility": "Sense and Sensibility (1811)",
    "prideprejudice": "Pride and Prejudice (1813)",
    "mansfieldpark": "Mansfield Park (1814)",
    "emma": "Emma (1815)",
    "northangerabbey": "Northanger Abbey (1818)",
    "persuasion": "Persuasion (1818)",
}
# A chapter goes to validation when its hash bucket (0..999) is below this: about 3% of chapters.
VALIDATION_PER_MILLE = 30
SPLIT_SALT = "e2s2-jax-corpus-v1"
CHAPTER_HEADING = re.compile(r"^(CHAPTER|Chapter)\s+([0-9IVXLC]+)\b")
VOLUME_HEADING = re.compile(r"^(VOLUME|Volume)\s+[0-9IVXLC]+\b")
# Closing lines that are not prose; "A NOTE ON THE TEXT" starts a modern editor's note (dropped).
END_OF_BOOK = {"THE END", "FINIS", "Finis"}
EDITORIAL_NOTE = "A NOTE ON THE TEXT"
# Project Gutenberg marks italics as _word_; the markup is removed, the words kept.
ITALICS = re.compile(r"_([^_]+)_")
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# A minimal reader of R's XDR serialisation format (version 2 and 3), enough for lazy-load data
# holding character vectors, integer/logical vectors, lists and pairlists with attributes.
# --------------------------------------------------------------------------------------------
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = (
    0,
    1,
    2,
    9,
    10,
    13,
    14,
    16,
    19,
)
REFSXP, NILVALUE_SXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP = 255, 254, 242, 241, 253
NA_INTEGER = -(2**31)


class RObject:
    """An R value: `value` (a Python list, str or None) plus its attributes by name."""

    def __init__(self, value, attributes: dict | None = None):
        self.value = value
        self.attributes = attributes or {}


class XdrReader:
    """Reads one serialized R object from bytes in XDR ('X\\n') format."""

    def __init__(self, data: bytes, what: str):
        self.data = data
        self.pos = 0
        self.what = what
        self.refs: list = []

    def fail(self, message: str):
        raise ValueError(f"{self.what}: {message} at byte {self.pos}; unsupported R data layout")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self) -> RObject:
        if self.data[:2] != b"X\n":
            self.fail(f"not XDR serialisation (header {self.data[:2]!r})")
        self.pos = 2
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # minimal R version to read it
        if version == 3:
            self.pos += 4 + self.int()  # native encoding name
        elif version != 2:
            self.fail(f"serialisation version {version}")
        return self.item()

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (NILVALUE_SXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            length = self.int()
            if length == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + length]
            self.pos += length
            return raw.decode("utf-8" if flags & (1 << 15 | 1 << 14 | 1 << 3) else "latin-1")
        if kind == LISTSXP:
            pairs: dict = {}
            attributes: dict = {}
            while True:
                if has_attr:
                    attributes.update(self.item())
                tag = self.item() if has_tag else None
                pairs[tag if tag is not None else len(pairs)] = self.item()
                flags = self.int()
                if flags & 0xFF != LISTSXP:
                    self.pos -= 4
                    tail = self.item()
                    if tail is not None:
                        self.fail("pairlist with a non-NULL tail")
                    return pairs
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (STRSXP, VECSXP, INTSXP, LGLSXP, REALSXP):
            length = self.int()
            if kind in (STRSXP, VECSXP):
                value = [self.item() for _ in range(length)]
            elif kind == REALSXP:
                value = list(struct.unpack_from(f">{length}d", self.data, self.pos))
                self.pos += 8 * length
            else:
                value = [
                    None if v == NA_INTEGER else v
                    for v in struct.unpack_from(f">{length}i", self.data, self.pos)
                ]
                self.pos += 4 * length
            return RObject(value, self.item() if has_attr else None)
        self.fail(f"SEXP type {kind}")


def read_lazy_load_db(data_dir: Path) -> dict[str, RObject]:
    """Returns every variable of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb`)."""
    index_path, db_path = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    for path in (index_path, db_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {data_dir} the package's data folder?")
    # The index is an .rds file (gzip); each database entry is a 4-byte length plus a zlib stream.
    index = XdrReader(gzip.decompress(index_path.read_bytes()), str(index_path)).read()
    names = index.attributes["names"].value
    variables = index.value[names.index("variables")]
    db = db_path.read_bytes()
    result = {}
    for name, location in zip(variables.attributes["names"].value, variables.value, strict=True):
        offset, length = location.value
        entry = db[offset : offset + length]
        (expected_length,) = struct.unpack_from(">I", entry, 0)
        payload = zlib.decompress(entry[4:])
        if len(payload) != expected_length:
            raise ValueError(f"{db_path}: entry {name!r} decompressed to the wrong length")
        result[name] = XdrReader(payload, f"{db_path}[{name}]").read()
    return result


# --------------------------------------------------------------------------------------------
# From book lines to paragraphs, chapters and the split.
# --------------------------------------------------------------------------------------------
def book_chapters(lines: list[str | None]) -> list[list[str]]:
    """Groups a book's lines into chapters of paragraphs; headings and front matter are dropped."""
    chapters: list[list[str]] = []
    paragraph: list[str] = []

    def flush():
        text = ITALICS.sub(r"\1", " ".join(" ".join(paragraph).split()))
        if text and chapters and text not in END_OF_BOOK:
            chapters[-1].append(text)
        paragraph.clear()

    for line in lines:
        line = (line or "").strip()
        if line == EDITORIAL_NOTE:
            break
        if not line:
            flush()
        elif CHAPTER_HEADING.match(line) and not paragraph:
            flush()
            chapters.append([])
        elif VOLUME_HEADING.match(line) and not paragraph:
            flush()
        else:
            paragraph.append(line)
    flush()
    return [chapter for chapter in chapters if chapter]


def is_validation(book: str, chapter_number: int) -> bool:
    digest = hashlib.sha256(f"{SPLIT_SALT}/{book}/{chapter_number}".encode()).hexdigest()
    return int(digest[:8], 16) % 1000 < VALIDATION_PER_MILLE


def build_splits(
    books: dict[str, RObject],
) -> tuple[list[str], list[str], dict[str, list[tuple[str, int, int]]]]:
    """Returns (train paragraphs, validation paragraphs, chapters) in book order; chapters maps
    each split to its (book, chapter number, paragraphs in the split) rows, in line order."""
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    chapters: dict[str, list[tuple[str, int, list[str]]]] = {"train": [], "validation": []}
    for book in BOOKS:
        if book not in books:
            raise KeyError(f"variable {book!r} not in the package data (found {sorted(books)})")
        for number, chapter in enumerate(book_chapters(books[book].value), start=1):
            split = "validation" if is_validation(book, number) else "train"
            splits[split].extend(chapter)
            chapters[split].append((book, number, chapter))
    # No paragraph text in both splits (short lines such as '"Yes."' recur across chapters).
    train_set = set(splits["train"])
    validation = [paragraph for paragraph in splits["validation"] if paragraph not in train_set]
    counts = {
        "train": [(book, number, len(chapter)) for book, number, chapter in chapters["train"]],
        "validation": [
            (book, number, sum(p not in train_set for p in paragraphs))
            for book, number, paragraphs in chapters["validation"]
        ],
    }
    counts["validation"] = [row for row in counts["validation"] if row[2]]
    return splits["train"], validation, counts


def chapter_index(rows: list[tuple[str, int, int]]) -> bytes:
    """The chapters file of a split: a header, then `book<TAB>chapter<TAB>paragraphs` per
    chapter in line order (its paragraphs are the next lines of the split's text file)."""
    lines = ["book\tchapter\tparagraphs"] + [f"{b}\t{c}\t{n}" for b, c, n in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def gzip_lines(lines: list[str]) -> bytes:
    # mtime=0 and no file name in the header: the same text gives the same bytes.
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=9, mtime=0)


# --------------------------------------------------------------------------------------------
# Getting the package.
# --------------------------------------------------------------------------------------------
def extract_data_dir(deb: Path, into: Path) -> Path:
    """Unpacks the .deb's data archive into `into` (dpkg-deb -x when present, else Python)."""
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    except FileNotFoundError:
        _extract_deb_with_python(deb, into)
    data_dir = into / DATA_DIR_IN_PACKAGE
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{deb} has no {DATA_DIR_IN_PACKAGE}: is it {PACKAGE}?")
    return data_dir


def _extract_deb_with_python(deb: Path, into: Path) -> None:
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a .deb (ar) archive")
    pos = 8
    while pos < len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        member = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise RuntimeError(f"{deb}: {name} is zstd-compressed; install dpkg-deb to unpack")
            with tarfile.open(fileobj=io.BytesIO(member)) as archive:
                archive.extractall(into, filter="data")
            return
        pos += 60 + size + (size % 2)
    raise ValueError(f"{deb} has no data.tar member")


def download_deb(into: Path) -> Path:
    subprocess.run(["apt-get", "download", PACKAGE], cwd=into, check=True)
    debs = sorted(into.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise FileNotFoundError(f"apt-get download {PACKAGE} left no .deb in {into}")
    return debs[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE} .deb (else apt-get)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "corpus")
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb.resolve() if args.deb else download_deb(Path(tmp))
        books = read_lazy_load_db(extract_data_dir(deb, Path(tmp) / "pkg"))
    train, validation, chapters = build_splits(books)
    held_out = {
        book: [
            n for n in range(1, len(book_chapters(books[book].value)) + 1) if is_validation(book, n)
        ]
        for book in BOOKS
    }
    print(f"validation chapters (counted from each book's start): {held_out}")
    outputs = {"train.txt.gz": gzip_lines(train), "validation.txt.gz": gzip_lines(validation)}
    # Chapter boundaries (the documents of the same-document task, e2s2_jax/data/same_document.py).
    for split, rows in chapters.items():
        outputs[f"{split}.chapters.tsv"] = chapter_index(rows)

    for name, lines in (("train", train), ("validation", validation)):
        words = sum(len(line.split()) for line in lines)
        size = len(outputs[f"{name}.txt.gz"])
        raw = sum(len(line.encode()) + 1 for line in lines)
        print(f"{name}: {len(lines)} lines, {words} words, {raw} bytes, {size} bytes gzipped")

    if args.check:
        stale = [
            n
            for n, blob in outputs.items()
            if not (args.out / n).is_file() or (args.out / n).read_bytes() != blob
        ]
        if stale:
            print(f"differs from {args.out}: {stale}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, blob in outputs.items():
        (args.out / name).write_bytes(blob)
    print(f"wrote {sorted(outputs)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
