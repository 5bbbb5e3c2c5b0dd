#!/usr/bin/env python
"""Train torchvision's Faster R-CNN (resnet50-FPN, from scratch) from shards with the stored RPN targets.

A short run: the model comes from frcnn_shard.torchvision.fasterrcnn_resnet50_fpn(loader), the batches
straight from make_loader. Whether it learns is judged on fixed probe batches (the first batches of the
split, the same sampler seeds), whose total loss is measured before and after training; the per-step
losses of a from-scratch model at batch 2 jump with each batch's boxes. From scratch with batch 2 the
run needs a linear warm-up and gradient clipping to stay stable.

    python scripts/train_torchvision.py                 # builds tiny_coco shards (torchvision-fpn) first
    python scripts/train_torchvision.py --shards DIR --steps 300 --device cuda
    python scripts/train_torchvision.py --stock         # torchvision's own anchor matching, for comparison
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from frcnn_shard.loader import ShardLoader, make_loader  # noqa: E402
from frcnn_shard.torchvision import fasterrcnn_resnet50_fpn  # noqa: E402

TINY_COCO = ROOT.parent / "shared" / "data" / "tiny_coco"


def build_tiny_shards(out: Path, image_size: int) -> Path:
    """Shards of ../shared/data/tiny_coco with the torchvision-fpn preset at ``image_size``."""
    from frcnn_shard.build import BuildOptions, build
    from frcnn_shard.transform import TransformConfig

    if not (TINY_COCO / "annotations" / "instances_train2017.json").exists():
        raise SystemExit(f"no --shards given and no tiny_coco at {TINY_COCO}")
    res = build(BuildOptions(source=f"coco:{TINY_COCO}", split="train2017", out=str(out), workers=0,
                             rows_per_shard=16, device="cpu", anchor_preset="torchvision-fpn",
                             transform=TransformConfig(image_size=(image_size, image_size))))
    return res.out_dir


def probe_loss(model: torch.nn.Module, batches: list, device: str, seed: int) -> dict[str, float]:
    """Mean losses over fixed batches, in training mode without gradients, with fixed sampler draws."""
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            for images, targets in batches:
                for k, v in model(images.to(device), targets).items():
                    sums[k] = sums.get(k, 0.0) + v.item()
    out = {k: v / len(batches) for k, v in sums.items()}
    out["total"] = sum(out.values())
    return out


def train(model: torch.nn.Module, loader: ShardLoader, args: argparse.Namespace,
          log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """SGD with momentum, linear warm-up and gradient clipping, for ``args.steps`` steps; the per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    losses: list[dict[str, float]] = []
    epoch, t0 = 0, time.perf_counter()
    while len(losses) < args.steps:
        loader.set_epoch(epoch)
        for images, targets in loader:
            step = len(losses)
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
            parts = model(images.to(args.device, non_blocking=True), targets)
            loss = sum(parts.values())
            if not math.isfinite(loss.item()):
                raise SystemExit(f"step {step}: non-finite loss {({k: v.item() for k, v in parts.items()})}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            losses.append({k: v.item() for k, v in parts.items()} | {"total": loss.item()})
            if (step + 1) % args.log_every == 0 or step == 0:
                log(f"step {step + 1:4d}  epoch {epoch}  loss {loss.item():.4f}  "
                    + "  ".join(f"{k[5:]} {v.item():.3f}" for k, v in parts.items())
                    + f"  {time.perf_counter() - t0:.1f}s")
            if len(losses) >= args.steps:
                break
        epoch += 1
    return losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, help="split folder (default: build tiny_coco into a temp dir)")
    p.add_argument("--image-size", type=int, default=400, help="canvas of the tiny_coco build (without --shards)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=10, help="steps of linear learning-rate warm-up")
    p.add_argument("--clip", type=float, default=10.0, help="gradient norm clip")
    p.add_argument("--box-batch-size", type=int, default=512,
                   help="RoIs sampled per image for the box head (torchvision's box_batch_size_per_image)")
    p.add_argument("--probe-batches", type=int, default=2, help="fixed batches the loss is judged on")
    p.add_argument("--stock", action="store_true", help="torchvision's own anchor matching instead of the stored targets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: read in this process)")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Entry point; returns the per-step losses and the probe losses before and after (the test uses them)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="train_tv_") as tmp:
        shards = args.shards or build_tiny_shards(Path(tmp), args.image_size)
        loader = make_loader(shards, args.batch_size, num_workers=args.workers, seed=args.seed, normalize=False,
                             drop_last=True)
        probe = make_loader(shards, args.batch_size, num_workers=0, shuffle=False, seed=args.seed, normalize=False)
        batches = [b for _, b in zip(range(args.probe_batches), probe)]
        torch.manual_seed(args.seed)
        model = fasterrcnn_resnet50_fpn(loader, weights_backbone=None, use_stored_targets=not args.stock,
                                        box_batch_size_per_image=args.box_batch_size)
        model.to(args.device).train()
        print(f"{loader}: {loader.num_samples} samples, {loader.anchors.shape[0]} anchors; "
              f"{'stock matching' if args.stock else 'stored targets'} on {args.device}")
        before = probe_loss(model, batches, args.device, args.seed)
        losses = train(model, loader, args)
        after = probe_loss(model, batches, args.device, args.seed)
    k = min(10, len(losses))
    print(f"per-step total loss: first {k} steps {np.mean([l['total'] for l in losses[:k]]):.4f}, "
          f"last {k} steps {np.mean([l['total'] for l in losses[-k:]]):.4f}")
    print(f"probe total loss ({len(batches)} fixed batches): before {before['total']:.4f}, after {after['total']:.4f} "
          f"({after['total'] / before['total']:.2f}x); RPN part {before['loss_objectness'] + before['loss_rpn_box_reg']:.4f}"
          f" -> {after['loss_objectness'] + after['loss_rpn_box_reg']:.4f}")
    return {"losses": losses, "probe_before": before, "probe_after": after}


if __name__ == "__main__":
    main()
