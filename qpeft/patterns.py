"""Regular expressions from configs (target_modules, exclude_modules, the keys of rank_pattern / alpha_pattern,
layers_pattern) run with time bounds: a file is untrusted input, and a backtracking pattern such as "(.|.)*Z"
would otherwise hang a load for minutes. The `regex` engine (a superset of `re`'s syntax, a dependency of
transformers) stops a match after MATCH_SECONDS; a pattern that slow on one module name is refused
(ConfigError naming the key), as is one that does not compile. Within ``budget()`` (one adapter added or loaded)
all matches together get LOAD_SECONDS: many patterns each under the bound cannot add up to minutes either."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

import regex

from .errors import ConfigError

MATCH_SECONDS = 0.25  # a module name is a few hundred characters: honest patterns take microseconds
LOAD_SECONDS = 5.0  # every match of one load: a 70B model's ~600 layers x dozens of patterns take milliseconds

_left: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("qpeft_regex_seconds_left", default=None)


@contextlib.contextmanager
def budget(seconds: float | None = None) -> Iterator[None]:
    """The matches inside share ``seconds`` (LOAD_SECONDS by default); nested budgets count against the outer."""
    if _left.get() is not None:
        yield
        return
    token = _left.set([LOAD_SECONDS if seconds is None else seconds])
    try:
        yield
    finally:
        _left.reset(token)


def _run(how, pattern: str, name: str, key: str):
    left = _left.get()
    timeout = MATCH_SECONDS if left is None else min(MATCH_SECONDS, left[0])
    if timeout <= 0:
        raise ConfigError(
            None, key, f"patterns took over {LOAD_SECONDS} s in all on this model's module names; refused"
        )
    start = time.perf_counter()
    try:
        return how(pattern, name, timeout=timeout)
    except regex.error as e:
        raise ConfigError(None, key, f"is not a valid regular expression: {pattern!r} ({e})") from None
    except TimeoutError:
        if timeout < MATCH_SECONDS:
            raise ConfigError(
                None, key, f"patterns took over {LOAD_SECONDS} s in all on this model's module names; refused"
            ) from None
        raise ConfigError(
            None,
            key,
            f"pattern {pattern!r} took over {MATCH_SECONDS} s on the module name "
            f"{name!r} (catastrophic backtracking); refused",
        ) from None
    finally:
        if left is not None:
            left[0] -= time.perf_counter() - start


def fullmatch(pattern: str, name: str, key: str):
    return _run(regex.fullmatch, pattern, name, key)


def match(pattern: str, name: str, key: str):
    return _run(regex.match, pattern, name, key)
