#!/usr/bin/env python
"""torchvision Faster R-CNN benchmark (issue 14): a training step with the stored RPN targets against
the same step with torchvision's own anchor matching.

On tiny_coco shards built with the torchvision-fpn preset at 400x400 (43,242 anchors; built once into
the git-ignored bench_data/), two fasterrcnn_resnet50_fpn models from frcnn_shard.torchvision with the
same initial weights (from scratch):

- stock:  ``use_stored_targets=False``: RegionProposalNetwork.assign_targets_to_anchors computes the IoU
          of every anchor with every box and runs Matcher(0.7, 0.3, low-quality) per image; its targets
          carry no stored anchor targets (nothing extra to move);
- stored: StoredTargetsRPN takes the loader's 256-anchor sample (``anchor_labels``, ``anchor_matched_gt``),
          which the transform moves to the device with the boxes.

A step is forward + backward + gradient clipping + SGD step on the same batch (uint8 images as the
loader delivers them, moved to the device inside the step), timed with the device synchronised at both
ends. The variants alternate step by step (which one goes first alternates too); the first
``--warmup-steps`` steps of each are not counted. Then assign_targets_to_anchors alone is timed on the
same batches, the targets already on the device, interleaved, ``--assign-repeats`` rounds.

Run:  python scripts/bench_torchvision.py                         # CPU, 2 threads, ~3-6 minutes on 2 cores
      python scripts/bench_torchvision.py --device cuda --batch-size 8 --steps 30
The markdown report goes to stdout and replaces the "torchvision-<device>" section of --out-md
(docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

import torch  # noqa: E402

from frcnn_shard.loader import make_loader  # noqa: E402
from frcnn_shard.shards import MANIFEST_NAME, read_manifest  # noqa: E402
from frcnn_shard.torchvision import fasterrcnn_resnet50_fpn  # noqa: E402

VARIANTS = ("stock", "stored")


def tv_shards() -> Path:
    """tiny_coco (50 rows) with the torchvision-fpn preset at 400x400, built once and cached."""
    from frcnn_shard.build import BuildOptions, build

    out = bc.BENCH_DATA / "tv_shards_400"
    split = out / "train2017"
    if (split / MANIFEST_NAME).exists() and read_manifest(split).get("complete"):
        return split
    bc.log(f"building torchvision-fpn shards of tiny_coco into {out} (once; cached)")
    build(BuildOptions(source=f"coco:{bc.require_tiny_coco()}", split="train2017", out=str(out), workers=0,
                       rows_per_shard=16, device="cpu", anchor_preset="torchvision-fpn", overwrite=True))
    return split


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def without_anchor_targets(targets: list[dict]) -> list[dict]:
    """What a stock torchvision user's targets hold: no stored anchor targets."""
    return [{k: v for k, v in t.items() if not k.startswith("anchor_")} for t in targets]


def batches_for(loader, n: int) -> list:
    """n batches from the loader (epochs repeated as needed), held in memory so that reading is not timed."""
    out, epoch = [], 0
    while len(out) < n:
        loader.set_epoch(epoch)
        out.extend(b for _, b in zip(range(n - len(out)), loader))
        epoch += 1
    return out


def make_models(loader, device: str, lr: float) -> dict:
    """The two models with the same initial weights, each with its SGD optimiser."""
    torch.manual_seed(0)
    stock = fasterrcnn_resnet50_fpn(loader, weights_backbone=None, use_stored_targets=False)
    stored = fasterrcnn_resnet50_fpn(loader, weights_backbone=None)
    stored.load_state_dict(stock.state_dict())
    out = {}
    for name, model in (("stock", stock), ("stored", stored)):
        model.to(device).train()
        out[name] = (model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4))
    return out


def step(model, opt, images: torch.Tensor, targets: list[dict], device: str) -> float:
    """One timed training step (seconds): forward, backward, clip, SGD step."""
    sync(device)
    t0 = time.perf_counter()
    loss = sum(model(images.to(device, non_blocking=True), targets).values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    opt.step()
    sync(device)
    if not torch.isfinite(loss):
        raise SystemExit(f"non-finite loss {loss.item()}")
    return time.perf_counter() - t0


def time_steps(models: dict, batches: list, device: str, warmup: int) -> dict[str, list[float]]:
    """Per-variant step times on the same batches, interleaved, first ``warmup`` steps dropped."""
    times = {v: [] for v in VARIANTS}
    for i, (images, targets) in enumerate(batches):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for v in order:
            model, opt = models[v]
            t = step(model, opt, images, targets if v == "stored" else without_anchor_targets(targets), device)
            if i >= warmup:
                times[v].append(t)
        bc.log(f"step {i + 1}/{len(batches)}: " + ", ".join(f"{v} {times[v][-1] * 1e3:.0f} ms" for v in VARIANTS
                                                           if times[v] and i >= warmup))
    return times


def rpn_anchors(model, images: torch.Tensor, device: str) -> list[torch.Tensor]:
    """The anchors the model's RPN gets for a batch (its transform, backbone and anchor generator)."""
    with torch.no_grad():
        image_list, _ = model.transform(list(images.to(device)))
        feats = list(model.backbone(image_list.tensors).values())
        return model.rpn.anchor_generator(image_list, feats)


def time_assign(models: dict, batches: list, device: str, repeats: int) -> dict[str, list[float]]:
    """assign_targets_to_anchors alone, per batch, targets on the device, interleaved rounds."""
    anchors = rpn_anchors(models["stored"][0], batches[0][0], device)
    on_device = [[{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in tg]
                 for _, tg in batches]
    times = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for targets in on_device:
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                rpn = models[v][0].rpn
                tg = targets if v == "stored" else without_anchor_targets(targets)
                sync(device)
                t0 = time.perf_counter()
                rpn.assign_targets_to_anchors(anchors[: len(tg)], tg)
                sync(device)
                times[v].append(time.perf_counter() - t0)
    return times


def report(args, steps: dict, assign: dict, facts: dict) -> str:
    """The markdown section."""
    med = {v: statistics.median(steps[v]) for v in VARIANTS}
    amed = {v: statistics.median(assign[v]) for v in VARIANTS}
    rows = [(v, bc.fmt(med[v] * 1e3, 0), bc.fmt(min(steps[v]) * 1e3, 0), f"{med['stock'] / med[v]:.3f}x",
             bc.fmt(amed[v] * 1e3, 3), f"{amed[v] / med[v] * 100:.2f}%") for v in VARIANTS]
    table = bc.md_table(["variant", "step median ms", "step min ms", "stock / this (median)",
                         "assign_targets_to_anchors median ms", "assign / step"], rows)
    saved = amed["stock"] - amed["stored"]
    paired = sorted(a / b for a, b in zip(steps["stock"], steps["stored"]))  # the same batch, back to back
    q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
    return "\n".join([
        bc.report_header(f"torchvision Faster R-CNN training step on {args.device} (scripts/bench_torchvision.py)"),
        f"fasterrcnn_resnet50_fpn from scratch (frcnn_shard.torchvision), tiny_coco shards with the torchvision-fpn "
        f"preset at 400x400 ({facts['anchors']:,} anchors), batch {args.batch_size}, uint8 images; "
        f"{len(steps['stock'])} timed steps per variant after {args.warmup_steps} warm-up steps, interleaved; "
        f"assign_targets_to_anchors alone: {len(assign['stock'])} calls per variant. "
        f"{facts['boxes_per_image']:.1f} boxes per image on average.",
        "",
        table,
        "",
        f"- **Step: stock / stored = {med['stock'] / med['stored']:.3f}x** (median step times of the same run); "
        f"per batch, the two steps back to back: median {statistics.median(paired):.3f}x, quartiles "
        f"{q1:.3f}x-{q3:.3f}x; steps took {bc.fmt(min(min(steps[v]) for v in VARIANTS) * 1e3, 0)}-"
        f"{bc.fmt(max(max(steps[v]) for v in VARIANTS) * 1e3, 0)} ms (the machine's load). The assignment, timed "
        f"apart, accounts for {med['stock'] / (med['stock'] - saved):.4f}x of it.",
        f"- **Anchor assignment: stock / stored = {amed['stock'] / amed['stored']:.0f}x**; the stored targets save "
        f"{bc.fmt(saved * 1e3, 2)} ms per batch, {saved / med['stock'] * 100:.2f}% of the stock step: the step is "
        "the backbone, the heads and their backward pass, so that is all the stored targets can save inside "
        "the step.",
    ]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads on the CPU")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--assign-repeats", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--out-md", default=str(bc.BENCH_MD))
    ap.add_argument("--no-md", action="store_true", help="print the report only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build (once) the shards, time both variants, publish the report."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    bc.BENCH_DATA.mkdir(exist_ok=True)
    loader = make_loader(tv_shards(), args.batch_size, seed=0, num_workers=0, normalize=False, drop_last=True)
    batches = batches_for(loader, args.warmup_steps + args.steps)
    models = make_models(loader, args.device, args.lr)
    steps = time_steps(models, batches, args.device, args.warmup_steps)
    assign = time_assign(models, batches[args.warmup_steps:], args.device, args.assign_repeats)
    boxes = [len(t["boxes"]) for _, tg in batches for t in tg]
    facts = {"anchors": int(loader.anchors.shape[0]), "boxes_per_image": sum(boxes) / len(boxes)}
    bc.publish(f"torchvision-{args.device.split(':')[0]}", report(args, steps, assign, facts), args.out_md, args.no_md)


if __name__ == "__main__":
    main()
