"""Shared pytest setup: quiet TensorFlow, float32 everywhere on CPU."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite's programs are compiled with LLVM at -O1 (XLA:CPU's default is -O3), here and in
# the processes the tests start, unless XLA_FLAGS already sets a level. Measured on
# tests/test_fusion.py, one process: 303 s at -O3, 280 s at -O2, 177 s at -O1, compile time
# 224 -> 119 s; the tests' programs are small, and -O3 spends its time unrolling and
# vectorising loops of a few iterations. Results are the same to the bit (the HLO and its
# fusions are the same; losses of the tiny E2S2 train step identical at -O1/-O2/-O3); the
# tiny E2S2 step runs about 7% slower, which the long training tests pay.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [*os.environ.get("XLA_FLAGS", "").split(), "--xla_backend_optimization_level=1"]
    )


def pytest_configure(config):
    """One persistent JAX compilation cache for the whole run: the xdist workers and the trainer
    subprocesses the tests start inherit it, so a program that several tests (or processes)
    compile, such as the tiny model's train step, compiles once. It is empty at the start of each
    run and removed at the end; a cache directory the user has set is left as it is."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import tempfile

    config._e2s2_jax_cache_dir = tempfile.mkdtemp(prefix="e2s2_jax_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._e2s2_jax_cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


def pytest_unconfigure(config):
    cache_dir = getattr(config, "_e2s2_jax_cache_dir", None)
    if cache_dir is not None:
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)


# The preprocessor tests' vocabulary (a small SentencePiece model trained once per session) and
# the bundled corpus tokenized with it; a module that needs another `vocabulary` defines its own.
@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    from preprocessor_helpers import small_vocabulary

    return small_vocabulary(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus_tokens(vocabulary):
    from preprocessor_helpers import encoded_corpus

    return encoded_corpus(vocabulary)
