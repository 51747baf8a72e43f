"""Regular expressions from configs (target_modules, exclude_modules, the keys of rank_pattern / alpha_pattern,
layers_pattern) run with a time bound: a file is untrusted input, and a backtracking pattern such as "(.|.)*Z"
would otherwise hang a load for minutes. The `regex` engine (a superset of `re`'s syntax, a dependency of
transformers) stops a match after MATCH_SECONDS; a pattern that slow on one module name is refused
(ConfigError naming the key), as is one that does not compile."""

from __future__ import annotations

import regex

from .errors import ConfigError

MATCH_SECONDS = 0.25  # a module name is a few hundred characters: honest patterns take microseconds


def _run(how, pattern: str, name: str, key: str):
    try:
        return how(pattern, name, timeout=MATCH_SECONDS)
    except regex.error as e:
        raise ConfigError(None, key, f"is not a valid regular expression: {pattern!r} ({e})") from None
    except TimeoutError:
        raise ConfigError(
            None,
            key,
            f"pattern {pattern!r} took over {MATCH_SECONDS} s on the module name "
            f"{name!r} (catastrophic backtracking); refused",
        ) from None


def fullmatch(pattern: str, name: str, key: str):
    return _run(regex.fullmatch, pattern, name, key)


def match(pattern: str, name: str, key: str):
    return _run(regex.match, pattern, name, key)
