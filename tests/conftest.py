"""Shared pytest setup: quiet TensorFlow, float32 everywhere on CPU."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
