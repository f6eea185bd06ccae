"""The checksums of a checkpoint step: `<step>/checksums.json`, the size and SHA-256 of every file
of the step, written once its save is complete and verified before it is restored or exported.

The train checkpoints (`training/checkpoints.py`) write and verify them; `interop/params_io.py`
verifies a train run's step before exporting its params. It imports nothing else of this package
but `errors`, so both can use it without importing each other.
"""

from __future__ import annotations

import hashlib
import json
import os

from etils import epath

from e2s2_jax.errors import CheckpointError

CHECKSUMS_NAME = "checksums.json"
_CHECKSUMS_VERSION = 1
_READ_CHUNK = 1 << 22  # bytes


class DamagedCheckpointError(CheckpointError):
    """A checkpoint step whose files do not match its `checksums.json`."""


def _size_and_sha256(path: epath.Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _step_files(step_dir: epath.Path) -> list[str]:
    """Paths of the files under `step_dir`, relative to it, without the checksums file."""
    files = []
    for root, _, names in step_dir.walk():
        for name in names:
            relative = (root / name).relative_to(step_dir).as_posix()
            if not relative.startswith(CHECKSUMS_NAME):
                files.append(relative)
    return sorted(files)


def write_checksums(step_dir: str | epath.Path) -> None:
    """Writes `step_dir/checksums.json`, the size and SHA-256 of every file of the complete
    checkpoint step `step_dir`: to a temporary name first, then renamed (never half-written)."""
    step_dir = epath.Path(step_dir)
    files = {}
    for name in _step_files(step_dir):
        size, sha256 = _size_and_sha256(step_dir / name)
        files[name] = {"bytes": size, "sha256": sha256}
    text = json.dumps({"version": _CHECKSUMS_VERSION, "files": files}, indent=1, sort_keys=True)
    temporary = step_dir / f"{CHECKSUMS_NAME}.tmp-{os.getpid()}"
    temporary.write_text(text)
    temporary.replace(step_dir / CHECKSUMS_NAME)


def verify_checksums(step_dir: str | epath.Path) -> bool:
    """True when every file listed in `step_dir/checksums.json` has its size and SHA-256;
    False when the step has no `checksums.json`. Raises DamagedCheckpointError naming the
    files that differ (missing, truncated, changed)."""
    step_dir = epath.Path(step_dir)
    checksums_path = step_dir / CHECKSUMS_NAME
    if not checksums_path.exists():
        return False
    try:
        files = json.loads(checksums_path.read_text())["files"]
        expected = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        raise DamagedCheckpointError(
            f"{checksums_path} is unreadable ({type(error).__name__}: {error})"
        ) from error
    problems = []
    for name, (size, sha256) in sorted(expected.items()):
        try:
            found_size, found_sha256 = _size_and_sha256(step_dir / name)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        except OSError as error:
            problems.append(f"{name} is unreadable ({error})")
            continue
        if found_size != size:
            problems.append(f"{name} has {found_size} bytes, {size} were written")
        elif found_sha256 != sha256:
            problems.append(f"{name} differs from what was written (SHA-256)")
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DamagedCheckpointError(f"{step_dir} is damaged: {'; '.join(problems[:3])}{more}")
    return True
