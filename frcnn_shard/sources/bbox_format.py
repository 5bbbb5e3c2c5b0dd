"""The source's box convention, decided from the data: ``[x, y, w, h]`` (xywh) or ``[x1, y1, x2, y2]``
(xyxy). The Hub's uploader writes xyxy, the official COCO files xywh; nothing is assumed: every build
records the evidence and the rule that decided (docs/FORMAT.md, "Source conventions").
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from ..errors import FrcnnShardError

BBOX_FORMAT_CHOICES = ("auto", "xywh", "xyxy")


class BboxFormatError(FrcnnShardError, ValueError):
    """The bbox convention cannot be decided from the data; ``evidence`` holds the counts seen."""

    def __init__(self, message: str, evidence: dict | None = None):
        super().__init__(message)
        self.evidence = dict(evidence or {})


def bbox_format_evidence(samples: Iterable[tuple[np.ndarray, int, int]], tol: float = 1.0) -> dict:
    """Count, over (raw boxes [N, 4], width, height) samples, the boxes that rule out each convention."""
    examined = xyxy_bad = xywh_bad = skipped = 0
    for boxes, width, height in samples:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        finite = np.isfinite(b).all(axis=1)
        skipped += int((~finite).sum())
        b = b[finite]
        examined += len(b)
        # Read as xyxy, a box whose far corner precedes its near corner is impossible.
        xyxy_bad += int(((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).sum())
        # Read as xywh, a box that reaches past the image (beyond rounding) is impossible.
        xywh_bad += int(((b[:, 0] + b[:, 2] > width + tol) | (b[:, 1] + b[:, 3] > height + tol)).sum())
    return {
        "boxes_examined": examined,
        "xyxy_violations": xyxy_bad,
        "xywh_violations": xywh_bad,
        "non_finite_skipped": skipped,
        "tol": float(tol),
    }


def decide_bbox_format(evidence: Mapping) -> str:
    """Return "xywh" or "xyxy" when exactly one is ruled out by the evidence; else raise BboxFormatError."""
    xyxy_out = evidence["xyxy_violations"] > 0
    xywh_out = evidence["xywh_violations"] > 0
    if xyxy_out and not xywh_out:
        return "xywh"
    if xywh_out and not xyxy_out:
        return "xyxy"
    counts = (
        f"{evidence['boxes_examined']} boxes examined, {evidence['xyxy_violations']} impossible as xyxy "
        f"(x2 < x1 or y2 < y1), {evidence['xywh_violations']} impossible as xywh (past the image edge)"
    )
    if xyxy_out and xywh_out:
        why = f"conflicting evidence: both conventions are ruled out ({counts})"
    else:
        why = f"no evidence either way ({counts})"
    raise BboxFormatError(f"cannot tell the bbox format: {why}; set bbox_format to xywh or xyxy", evidence)


def bbox_format_record(
    requested: str, samples: list[tuple[np.ndarray, int, int]], where: str, fixed: str | None = None
) -> dict:
    """The bbox-format decision of a source from its examined rows (raises BboxFormatError when auto cannot decide)."""
    evidence = bbox_format_evidence(samples)
    record = {"requested": requested, "decision": None, "evidence": evidence, "rows_examined": len(samples)}
    if fixed is not None:
        record["decision"] = fixed
        record["rule"] = f"fixed by the source layout ({fixed})"
    elif requested == "auto":
        try:
            record["decision"] = decide_bbox_format(evidence)
        except BboxFormatError as e:
            raise BboxFormatError(f"{where}, first {len(samples)} rows: {e}", evidence) from e
        record["rule"] = "auto: the one convention not ruled out by the examined boxes"
    else:
        record["decision"] = requested
        record["rule"] = "explicit"
    # Make a wrong explicit choice visible in the manifest.
    violations = evidence[f"{record['decision']}_violations"]
    record["contradicted_by_evidence"] = bool(violations > 0)
    return record
