"""The torchvision training script learns from the stored targets: the total loss on fixed probe batches
falls clearly within a few steps (a small canvas keeps a resnet50-FPN step short on this CPU)."""
from __future__ import annotations

import math

import torch

from conftest import load_script, require_extra


def test_short_training_run_total_loss_falls(tiny_coco, capsys):
    require_extra("torchvision")
    mod = load_script("train_torchvision")
    threads = torch.get_num_threads()
    try:
        res = mod.main(["--image-size", "128", "--box-batch-size", "128", "--steps", "16", "--warmup", "4",
                        "--threads", "2", "--log-every", "8", "--seed", "0"])
    finally:
        torch.set_num_threads(threads)
    assert len(res["losses"]) == 16 and all(math.isfinite(l["total"]) for l in res["losses"])
    before, after = res["probe_before"]["total"], res["probe_after"]["total"]
    assert after < 0.6 * before, (before, after)  # with --lr 0 the two are equal
    out = capsys.readouterr().out
    assert "stored targets on cpu" in out and "probe total loss" in out
