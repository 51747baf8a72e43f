"""The error type of qpeft's configuration and file checks: one class users can catch for every bad config value
or file field, naming the source (file or object), the key and the problem. A ValueError, so code that caught
ValueError before still does."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or file field that qpeft refuses: ``source`` (a file path or a config's name),
    ``key`` and the problem are in the message."""

    def __init__(self, source: str | None, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: " if source else ""
        super().__init__(f"qpeft: {where}{key} {problem}")
