"""Pilot: span corruption over the bundled corpus plus the downstream train splits' text.

Every downstream train example gives two documents (its inputs, its targets). A line whose
normalised text equals any downstream validation or test inputs/targets is left out.
"""

import gzip
from pathlib import Path

from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES, BUNDLED_VALIDATION_FILES
from scripts.build_downstream import normalise  # the splits' own dedup normalisation
from tasks.downstream import DOWNSTREAM_SPECS, dataset_files, read_tsv_examples
from tasks.registration import register_text_task
from tasks.study import STUDY_VOCABULARY

HERE = Path(__file__).resolve().parent
TEXT = HERE / "downstream_train_text.txt.gz"


if not TEXT.exists():
    held = set()
    for dataset in DOWNSTREAM_SPECS:
        for split in ("validation", "test"):
            for a, b in read_tsv_examples(dataset_files(dataset)[split]):
                held.update((normalise(a), normalise(b)))
    lines, dropped = [], 0
    for dataset in DOWNSTREAM_SPECS:
        for a, b in read_tsv_examples(dataset_files(dataset)["train"]):
            for t in (a, b):
                if normalise(t) in held:
                    dropped += 1
                else:
                    lines.append(t.replace("\n", " "))
    TEXT.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    print(f"in-domain text: {len(lines)} lines kept, {dropped} dropped (held-out text)")

register_text_task(
    "study_span_corruption_in_domain",
    {"train": [*BUNDLED_TRAIN_FILES, str(TEXT)], "validation": BUNDLED_VALIDATION_FILES},
    "span_corruption",
    STUDY_VOCABULARY,
)
