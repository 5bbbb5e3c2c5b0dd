"""The RPN training script learns from the loader's targets alone: its loss falls clearly on tiny_coco."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_script


def _load_script():
    return load_script("train_rpn")


def test_model_anchor_order_is_checked(tiny_shards):
    mod = _load_script()
    from frcnn_shard.loader import make_loader
    from frcnn_shard import anchors as anc

    loader = make_loader(tiny_shards, 2, num_workers=0)
    spec = anc.AnchorSpec.from_dict(loader.manifest["anchors"]["spec"])
    ours = mod.model_anchors(spec)
    loader.check_anchors(ours)
    model = mod.TinyRPN(spec.strides, spec.cells_per_location(0))
    logits, deltas = model(torch.zeros(1, 3, *spec.image_hw))
    assert logits.shape == (1, len(ours)) and deltas.shape == (1, len(ours), 4)
    # Flattening cells before rows (a classic mistake) is caught.
    wrong = ours.clone()
    n = spec.cells_per_location(0)
    fh, fw = spec.feature_hw(0)
    wrong[: fh * fw * n] = ours[: fh * fw * n].view(fh, fw, n, 4).permute(2, 0, 1, 3).reshape(-1, 4)
    with pytest.raises(AssertionError):
        loader.check_anchors(wrong)


def test_short_training_run_loss_falls(tiny_shards, capsys):
    mod = _load_script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast on a shared 2-core box
    try:
        losses = mod.main(["--shards", str(tiny_shards), "--steps", "150", "--batch-size", "8",
                           "--lr", "2e-3", "--seed", "0", "--log-every", "25"])
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 150 and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)
    out = capsys.readouterr().out
    assert "step   25" in out and "loss" in out
