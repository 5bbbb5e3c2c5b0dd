"""The sample format: what one sample is inside a shard, in one place.

docs/FORMAT.md is the contract in words; this package is its one implementation, read by the build,
the loader, check, stats and show alike:

- ``members``: member names, their order and per-member rules, and the one group-by-key every tar
  reader uses;
- ``record``: the JSON record <-> arrays;
- ``targets``: the packed anchor targets (``rpn.npz``);
- ``image``: the stored image's header rules and its decode.
"""
from __future__ import annotations

FORMAT_VERSION = "2.1"  # major.minor: readers refuse an unknown major, accept any minor
