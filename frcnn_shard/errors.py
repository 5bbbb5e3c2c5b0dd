"""The package's common exception root, and the build's exceptions (shared by the build, its parts and the
engines that run them).

Every exception frcnn-shard raises on purpose is a ``FrcnnShardError``, so a caller can catch all of them at
once; each also keeps the built-in base it always had (ValueError for bad input, RuntimeError for a build
that cannot go on, OSError for a file that is not a regular file), so existing ``except`` clauses still match.
This module imports nothing of the package: every layer may import it.
"""
from __future__ import annotations


class FrcnnShardError(Exception):
    """The root of every exception frcnn-shard raises on purpose."""


class BuildError(FrcnnShardError, RuntimeError):
    """The build cannot start or cannot go on; the message says why and what is kept."""


class OptionError(BuildError):
    """An option value that makes no sense; ``option`` is the BuildOptions field it concerns."""

    def __init__(self, option: str, reason: str):
        super().__init__(f"{option} {reason}")
        self.option, self.reason = option, reason


class BuildInterrupted(BuildError):
    """Stopped by the user or a signal; everything published so far is intact and resumable."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum  # SIGINT (Ctrl-C) or SIGTERM: the CLI exits with 128 + signum


class SourceError(BuildError):
    """The source failed mid-stream (after the retries allowed for transient errors)."""


class LockedError(BuildError):
    """Another build holds the lock on this output (the message names the holder)."""


class MergeError(BuildError):
    """The parts of a build cannot be merged yet: one is missing, unfinished or inconsistent (named)."""


class PartRecordError(BuildError):
    """A part record that breaks its rules (malformed, not JSON, too deep): the message names the file and rule."""


class SourceFormError(FrcnnShardError, ValueError):
    """A source that is none of the forms frcnn-shard reads, or whose annotations break a rule (named with the file)."""
