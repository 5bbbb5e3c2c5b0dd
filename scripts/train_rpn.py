#!/usr/bin/env python
"""Train a small RPN on the CPU from frcnn-shard shards: proof that the loader's targets plug into a loss.

The model (a few strided convs + an RPN head shared over the levels) generates its own anchors from
the manifest's spec and flattens its outputs in the spec order (level, row, col, cell anchor); the
loader's check_anchors() verifies both against the shards before training starts. The loss uses only
``anchor_labels`` and ``anchor_matched_gt``: BCE objectness over sampled anchors (label != -1), smooth L1
on anchors.encode_deltas(anchor, matched box) over the positives.

    python scripts/train_rpn.py                      # builds shards of ../shared/data/tiny_coco first
    python scripts/train_rpn.py --shards DIR --steps 300 --batch-size 4 --lr 2e-3
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
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from frcnn_shard import anchors as anc  # noqa: E402
from frcnn_shard.loader import ShardLoader, make_loader, normalize_batch  # noqa: E402

TINY_COCO = ROOT.parent / "shared" / "data" / "tiny_coco"


# ------------------------------------------------------------------------------------------ model


def model_anchors(spec: anc.AnchorSpec) -> torch.Tensor:
    """The model's own anchor generator: float32 [A, 4] in the order its head flattens its outputs."""
    if spec.round_cells or spec.pad_multiple != 1 or spec.stride_from_padding or spec.ratio_convention != "w/h":
        raise SystemExit("this demo model supports w/h ratios, unrounded cells and unpadded images only")
    out = []
    for level, stride in enumerate(spec.strides):
        fh, fw = math.ceil(spec.image_hw[0] / stride), math.ceil(spec.image_hw[1] / stride)
        pairs = [(s, r) for s in spec.sizes[level] for r in spec.ratios]  # within-cell order: size, ratio
        if spec.order == "level,row,col,ratio,size":
            pairs = [(s, r) for r in spec.ratios for s in spec.sizes[level]]
        wh = torch.tensor([[s * math.sqrt(r), s / math.sqrt(r)] for s, r in pairs], dtype=torch.float64)
        cell = torch.cat([-wh / 2, wh / 2], dim=1).float()  # [n, 4], zero-centred
        cx = ((torch.arange(fw, dtype=torch.float64) + spec.offset) * stride).float()
        cy = ((torch.arange(fh, dtype=torch.float64) + spec.offset) * stride).float()
        shift = torch.stack(torch.broadcast_tensors(cx[None, :], cy[:, None], cx[None, :], cy[:, None]), dim=-1)
        out.append((shift[:, :, None, :] + cell[None, None]).reshape(-1, 4))  # row, col, cell
    return torch.cat(out)


class TinyRPN(nn.Module):
    """Strided 3x3 convs giving one feature map per anchor stride, and an RPN head shared over levels."""

    def __init__(self, strides: tuple[int, ...], cells: int, width: int = 64):
        super().__init__()
        if any(s < 2 or s & (s - 1) for s in strides) or len(set(strides)) != len(strides):
            raise SystemExit(f"strides must be distinct powers of two >= 2, got {strides}")
        self.strides = tuple(strides)
        self.depth = int(math.log2(max(strides)))
        chans = [3] + [min(width, 16 * 2 ** i) for i in range(self.depth)]
        # Each conv halves with ceil(n / 2), exactly the spec's ceil(H / stride) feature size.
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False),
                          nn.GroupNorm(8, chans[i + 1]), nn.ReLU(inplace=True))
            for i in range(self.depth)
        )
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(chans[int(math.log2(s))], width, 1) for s in strides})
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.objectness = nn.Conv2d(width, cells, 1)
        self.deltas = nn.Conv2d(width, 4 * cells, 1)
        self.cells = cells
        for m in (self.objectness, self.deltas):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B,3,H,W] -> objectness logits [B, A] and deltas [B, A, 4], A in spec order."""
        feats = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if 2 ** (i + 1) in self.strides:
                feats[2 ** (i + 1)] = x
        logits, deltas = [], []
        for s in self.strides:  # level order
            h = F.relu(self.conv(self.lateral[str(s)](feats[s])))
            b, _, fh, fw = h.shape
            # [B, n, H, W] -> [B, H, W, n] -> [B, H*W*n]: row, col, cell anchor.
            logits.append(self.objectness(h).permute(0, 2, 3, 1).reshape(b, -1))
            d = self.deltas(h).view(b, self.cells, 4, fh, fw).permute(0, 3, 4, 1, 2)
            deltas.append(d.reshape(b, -1, 4))
        return torch.cat(logits, 1), torch.cat(deltas, 1)


# ------------------------------------------------------------------------------------------- loss


def rpn_loss(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, targets: list[dict]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(objectness BCE over labels != -1, smooth L1 on encoded deltas over positives) from the loader's targets."""
    labels = torch.stack([t["anchor_labels"] for t in targets])  # [B, A]
    matched = torch.stack([t["anchor_matched_gt"] for t in targets])  # [B, A, 4]
    sampled = labels != -1
    obj = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled].float())
    pos = labels == 1
    b_idx, a_idx = pos.nonzero(as_tuple=True)
    if len(a_idx) == 0:
        return obj, deltas.sum() * 0.0
    target = torch.from_numpy(anc.encode_deltas(anchors[a_idx].numpy(), matched[b_idx, a_idx].numpy()))
    box = F.smooth_l1_loss(deltas[b_idx, a_idx], target, beta=1.0 / 9, reduction="sum") / sampled.sum().clamp(min=1)
    return obj, box


# -------------------------------------------------------------------------------------- training


def train(loader: ShardLoader, steps: int, lr: float, seed: int, log_every: int = 20,
          log: Callable[[str], None] = print) -> list[float]:
    """Train for ``steps`` steps (re-iterating epochs with set_epoch) and return the loss of every step."""
    torch.manual_seed(seed)
    spec = anc.AnchorSpec.from_dict(loader.manifest["anchors"]["spec"])
    anchors = model_anchors(spec)
    loader.check_anchors(anchors)  # the head's output order == the shards' anchor order
    cells = {spec.cells_per_location(level) for level in range(spec.num_levels)}
    if len(cells) != 1:
        raise SystemExit("a head shared over levels needs the same number of anchors per cell on every level")
    model = TinyRPN(spec.strides, cells.pop())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    epoch, t0 = loader.epoch, time.perf_counter()
    while len(losses) < steps:
        loader.set_epoch(epoch)
        for images, targets in loader:
            x = normalize_batch(images) if images.dtype == torch.uint8 else images
            logits, deltas = model(x)
            obj, box = rpn_loss(logits, deltas, anchors, targets)
            loss = obj + box
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            n = len(losses)
            if n % log_every == 0 or n == 1:
                log(f"step {n:4d}  epoch {epoch}  loss {loss.item():.4f}  (objectness {obj.item():.4f}, "
                    f"box {box.item():.4f})  {time.perf_counter() - t0:.1f}s")
            if n >= steps:
                break
        epoch += 1
    return losses


def build_tiny_shards(out: Path) -> Path:
    """Build shards of ../shared/data/tiny_coco into ``out`` (resumes / reuses a complete build)."""
    from frcnn_shard.build import BuildOptions, build

    if not (TINY_COCO / "annotations" / "instances_train2017.json").exists():
        raise SystemExit(f"no --shards given and no tiny_coco at {TINY_COCO}")
    res = build(BuildOptions(source=f"coco:{TINY_COCO}", split="train2017", out=str(out), workers=0,
                             rows_per_shard=16, device="cpu"))
    return res.out_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, help="shard directory (default: build tiny_coco into a temp dir)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: read in this process)")
    p.add_argument("--log-every", type=int, default=20)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    """Entry point; returns the per-step losses (the test uses them)."""
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="train_rpn_") as tmp:
        shards = args.shards or build_tiny_shards(Path(tmp))
        loader = make_loader(shards, args.batch_size, num_workers=args.workers, seed=args.seed,
                             normalize=False, drop_last=True)
        print(f"{loader}: {loader.num_samples} samples, {loader.anchors.shape[0]} anchors")
        losses = train(loader, args.steps, args.lr, args.seed, args.log_every)
    k = min(10, len(losses))
    print(f"mean loss: first {k} steps {np.mean(losses[:k]):.4f}, last {k} steps {np.mean(losses[-k:]):.4f}")
    return losses


if __name__ == "__main__":
    main()
