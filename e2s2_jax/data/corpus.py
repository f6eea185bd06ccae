"""The bundled pretraining corpus (six Jane Austen novels in data/corpus/) and demo vocab size.

See data/README.md for the source, licence, split and figures; scripts/build_corpus.py rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "corpus"
# One paragraph per line, gzip; validation holds out whole chapters (about 4% of the words).
BUNDLED_TRAIN_FILES: list[str] = [str(CORPUS_DIR / "train.txt.gz")]
BUNDLED_VALIDATION_FILES: list[str] = [str(CORPUS_DIR / "validation.txt.gz")]
# Each split's chapters (book, chapter, paragraphs), in line order: the same-document task's
# documents (e2s2_jax/data/same_document.py).
BUNDLED_TRAIN_CHAPTERS = str(CORPUS_DIR / "train.chapters.tsv")
BUNDLED_VALIDATION_CHAPTERS = str(CORPUS_DIR / "validation.chapters.tsv")
# SentencePiece pieces of the demo vocabulary, before seqio's 100 extra ids (total 8100).
DEMO_VOCAB_SIZE = 8000


def check_bundled_corpus() -> None:
    """Raises FileNotFoundError naming a missing bundled file and how to get it back."""
    chapters = [BUNDLED_TRAIN_CHAPTERS, BUNDLED_VALIDATION_CHAPTERS]
    for path in BUNDLED_TRAIN_FILES + BUNDLED_VALIDATION_FILES + chapters:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"bundled corpus file {path} is missing: run from a git checkout of e2s2-jax "
                "(the corpus lives in data/, not in the installed package) or rebuild it with "
                "`python scripts/build_corpus.py`"
            )
