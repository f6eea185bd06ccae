"""What the sharded, resumable offline jobs share (`ssr-generate`, `ssr/job.py`; `score-tokens`,
`self_evolution/job.py`): process p of P takes the example ids with `id % P == p` in numbered
chunks; a chunk is committed by renaming its finished file into place; a resumed job must use
the settings it started with."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import tensorflow as tf

from e2s2_jax.errors import ConfigError


def write_atomically(path: str, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it into place: a reader (or
    a resumed job) sees the whole file or none of it."""
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp_path, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp_path, path, overwrite=True)


def chunks(
    examples: Iterator[tuple[int, str]], process_index: int, process_count: int, size: int
) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """This process's examples (`id % process_count == process_index`), in numbered chunks."""
    chunk, number = [], 0
    for example_id, text in examples:
        if example_id % process_count != process_index:
            continue
        chunk.append((example_id, text))
        if len(chunk) == size:
            yield number, chunk
            chunk, number = [], number + 1
    if chunk:
        yield number, chunk


def check_job_config(
    output_dir: str, job_config: Mapping, filename: str = "ssr_job.json", job: str = "an SSR job"
) -> None:
    """Writes OUTPUT_DIR/`filename`, or checks a resumed job uses the same settings (other
    sharding, chunking or seeds would duplicate or skip examples)."""
    path = os.path.join(output_dir, filename)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            previous = json.load(f)
        changed = {k: (previous.get(k), v) for k, v in job_config.items() if previous.get(k) != v}
        if changed:
            raise ConfigError(
                f"{output_dir} holds output of {job} with other settings {changed} "
                "(was, now): resume with the same settings and process count, or write to a "
                "new output_dir."
            )
        return
    write_atomically(path, json.dumps(dict(job_config), indent=1).encode())
