"""`check`'s report: the rule names it prints, one Problem per broken rule, and the CheckReport.

docs/INSPECT.md explains each rule; the rules themselves live in ``sample_rules`` (one sample),
``shard_rules`` (one shard file and its tar) and ``folder_rules`` (the folder against its manifest).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..format.image import RULE_IMAGE_DECODE, RULE_IMAGE_SIZE
from ..format.members import RULE_MEMBER_NAME, RULE_MEMBERS
from ..format.record import RULE_BOX_INVALID, RULE_JSON_INVALID, RULE_KEY_MISMATCH, RULE_LABEL_INVALID
from ..words import human_bytes, plural

# Rule names, as printed in reports and matched by tests; docs/INSPECT.md explains each one.
RULE_MANIFEST_INCOMPLETE = "manifest_incomplete"
RULE_MANIFEST_TOTALS = "manifest_totals"
RULE_SHARD_MISSING = "shard_missing"
RULE_SHARD_EXTRA = "shard_extra"
RULE_PARTIAL_FILE = "partial_file"
RULE_SHARD_UNREADABLE = "shard_unreadable"
RULE_SHARD_SIZE = "shard_size"
RULE_SHARD_SHA256 = "shard_sha256"
RULE_TAR_UNREADABLE = "tar_unreadable"
RULE_TAR_TRAILING = "tar_trailing"
RULE_SHARD_COUNT = "shard_count"
RULE_SHARD_KEYS = "shard_keys"
RULE_KEY_DUPLICATE = "key_duplicate"
RULE_TARGETS_INVALID = "targets_invalid"
RULE_TARGETS_COUNTS = "targets_counts"
RULE_TARGETS_DEEP = "targets_deep"
RULE_DROPS_FILE = "drops_file"
RULE_SPLIT_EMPTY = "split_empty"

RULES: tuple[str, ...] = (
    RULE_MANIFEST_INCOMPLETE, RULE_MANIFEST_TOTALS, RULE_SHARD_MISSING, RULE_SHARD_EXTRA,
    RULE_PARTIAL_FILE, RULE_SHARD_UNREADABLE, RULE_SHARD_SIZE, RULE_SHARD_SHA256, RULE_TAR_UNREADABLE,
    RULE_TAR_TRAILING, RULE_MEMBER_NAME, RULE_MEMBERS, RULE_SHARD_COUNT, RULE_SHARD_KEYS,
    RULE_KEY_DUPLICATE, RULE_KEY_MISMATCH, RULE_JSON_INVALID, RULE_IMAGE_DECODE, RULE_IMAGE_SIZE,
    RULE_BOX_INVALID, RULE_LABEL_INVALID, RULE_TARGETS_INVALID, RULE_TARGETS_COUNTS, RULE_TARGETS_DEEP,
    RULE_DROPS_FILE, RULE_SPLIT_EMPTY,
)


Found = list[tuple[str, str]]  # (rule, detail) pairs found for one sample


@dataclass(frozen=True)
class Problem:
    """One broken rule: where (shard file name, sample key or '-') and what."""

    shard: str
    key: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key or '-'}: {self.rule}: {self.detail}"

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"shard": self.shard, "key": self.key, "rule": self.rule, "detail": self.detail}


@dataclass
class CheckReport:
    """The outcome of check_shards: what was read and every problem found."""

    shard_dir: str
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    deep: bool = False
    fraction: float = 1.0
    deep_samples: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no rule was broken."""
        return not self.problems

    def rule_counts(self) -> dict[str, int]:
        """Problems per rule, in the order of RULES."""
        c = Counter(p.rule for p in self.problems)
        return {r: c[r] for r in RULES if c[r]} | {r: n for r, n in c.items() if r not in RULES}

    def summary_line(self) -> str:
        """One line: what was checked and how many problems, by rule."""
        what = f"checked {plural(self.samples, 'sample')} in {plural(self.shards, 'shard')} ({human_bytes(self.bytes)})"
        if self.deep:
            what += f", {self.deep_samples} deep-checked (fraction {self.fraction:g})"
        if self.ok:
            return f"{what}: 0 problems"
        by_rule = ", ".join(f"{r} {n}" for r, n in self.rule_counts().items())
        return f"{what}: {plural(len(self.problems), 'problem')} ({by_rule})"

    def to_dict(self) -> dict:
        """JSON-able form (for `check --json`)."""
        return {
            "shard_dir": self.shard_dir, "ok": self.ok, "samples": self.samples, "shards": self.shards,
            "bytes": self.bytes, "deep": self.deep, "fraction": self.fraction if self.deep else None,
            "deep_samples": self.deep_samples, "seconds": round(self.seconds, 3),
            "problem_counts": self.rule_counts(), "problems": [p.to_dict() for p in self.problems],
        }
