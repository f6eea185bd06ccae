"""Checks on a parsed Gin configuration, run before any work starts: macros bound but never used
(a misspelt `--gin.TRAIN_STEP=10`), and integer settings that must be positive."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator, Sequence

import gin

from e2s2_jax.errors import ConfigError

_MACRO = "gin.macro"

# Integer settings each job needs, as (configurable, parameter, smallest allowed value); a
# parameter may also be None where its default is None.
INTEGER_SETTINGS = {
    "train": (
        ("train", "train_steps", 1),
        ("train", "batch_size", 1),
        ("train", "num_microbatches", 1),
        ("train", "checkpoint_every", 1),
        ("train", "keep_checkpoints", 1),
        ("train", "log_every", 1),
        ("train", "eval_every", 0),
        ("train", "eval_batches", 1),
        ("train", "stop_after_steps", 1),
        ("train", "skip_nonfinite_steps", 0),
        ("train", "attention_entropy_every", 0),
    ),
    "eval": (
        ("evaluate", "batch_size", 1),
        ("evaluate", "eval_batches", 1),
        ("evaluate", "max_decode_examples", -1),  # -1: the whole split
    ),
    "infer": (("infer", "batch_size", 1), ("infer", "max_examples", 1)),
    "probe": (
        ("probe", "batch_size", 1),
        ("probe", "max_train_examples", 0),
        ("probe", "max_test_examples", 0),
    ),
    "ssr-generate": (),
    "compile": (
        ("train", "train_steps", 1),
        ("train", "batch_size", 1),
        ("train", "num_microbatches", 1),
    ),
    "score-tokens": (
        ("score_tokens", "batch_size", 1),
        ("score_tokens", "examples_per_chunk", 1),
        ("score_tokens", "max_tokens_per_example", 1),
    ),
}


def _references(value) -> Iterator[gin.config.ConfigurableReference]:
    if isinstance(value, gin.config.ConfigurableReference):
        yield value
    elif isinstance(value, list | tuple | set):
        for item in value:
            yield from _references(item)
    elif isinstance(value, dict):
        for item in (*value.keys(), *value.values()):
            yield from _references(item)


def _bound_macros() -> set[str]:
    return {scope for (scope, selector) in gin.config._CONFIG if selector == _MACRO}  # noqa: SLF001


def unreferenced_macros() -> list[str]:
    """Macros bound in the parsed configuration that no binding (or other macro) refers to."""
    referenced = set()
    for values in gin.config._CONFIG.values():  # noqa: SLF001
        for value in values.values():
            referenced.update(
                "/".join(ref.scopes) for ref in _references(value) if ref.selector == _MACRO
            )
    return sorted(_bound_macros() - referenced)


def check_macros(command_line_bindings: Sequence[str]) -> list[str]:
    """Raises ConfigError for a macro bound on the command line that nothing uses (a misspelling
    would otherwise leave the Gin file's value in force without a word); returns the unused
    macros the Gin files bind, for a warning."""
    unused = unreferenced_macros()
    on_command_line = {
        binding.split("=", 1)[0].strip() for binding in command_line_bindings if "=" in binding
    }
    typed = [name for name in unused if name in on_command_line]
    if typed:
        used = sorted(_bound_macros() - set(unused))
        hints = []
        for name in typed:
            close = difflib.get_close_matches(name, used, n=1)
            hints.append(f"--gin.{name}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(
            f"{', '.join(hints)}: no binding in the Gin files uses this macro, so it would "
            f"change nothing; use one of the macros they use: {', '.join(used)}."
        )
    return [name for name in unused if name not in on_command_line]


def _resolve(value) -> tuple[object, str | None]:
    """A bound value with macro references followed (`%TRAIN_STEPS` -> its value), and the
    last macro followed (None when the value is bound directly)."""
    macro = None
    for _ in range(32):  # a macro bound to a macro bound to ...; Gin itself rejects cycles
        if not (isinstance(value, gin.config.ConfigurableReference) and value.selector == _MACRO):
            break
        macro = "/".join(value.scopes)
        value = gin.query_parameter(f"{macro}/{_MACRO}.value")
    return value, macro


def check_integer_settings(mode: str, functions: dict) -> None:
    """Raises ConfigError naming the binding (and the macro it reads) when one of `mode`'s
    integer settings is not an integer or is below its minimum (`TRAIN_STEPS="ten"`,
    `BATCH_SIZE=0`, `train.log_every=0`); `functions` maps each configurable name to its
    function, for the defaults of parameters left unbound."""
    for configurable, parameter, minimum in INTEGER_SETTINGS[mode]:
        name = f"{configurable}.{parameter}"
        try:
            value, macro = _resolve(gin.query_parameter(name))
        except ValueError:  # not bound: the function's default
            value = inspect.signature(functions[configurable]).parameters[parameter].default
            macro = None
        if value is None or isinstance(value, gin.config.ConfigurableReference):
            continue  # None is allowed where it is the default; a @call is checked when made
        if value is gin.REQUIRED or repr(value) == "%gin.REQUIRED":
            continue  # reported as a missing required macro
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            setting = f"{macro} (read by {name})" if macro else name
            raise ConfigError(
                f"{setting} = {value!r}: must be an integer >= {minimum}; bind it as one, "
                f"e.g. --gin.{macro or name}={max(minimum, 1) * 10}."
            )
