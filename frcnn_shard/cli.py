"""The `frcnn-shard` command: parses options, calls library functions, prints. Nothing else lives here."""
from __future__ import annotations

import json
import os
import sys

import click

from . import __version__


def _floats(text: str | None, what: str) -> tuple | None:
    """'0.5,1,2' -> (0.5, 1.0, 2.0)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _sizes(text: str | None) -> tuple | None:
    """'32,64' -> ((32.0,), (64.0,)); '32/40,64/80' gives several sizes per level."""
    if text is None:
        return None
    try:
        return tuple(tuple(float(s) for s in level.split("/")) for level in text.split(","))
    except ValueError:
        raise click.BadParameter(f"--anchor-sizes: expected e.g. 32,64,128 or 32/40,64/80, got {text!r}") from None


def _fail(message: str, code: int = 1) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="frcnn-shard")
def main() -> None:
    """Preprocess COCO into WebDataset shards with precomputed RPN anchor targets, and inspect them."""


@main.command()
@click.option("--source", default="detection-datasets/coco", show_default=True,
              help="Hub dataset id, a local folder in the Hub's layout, or coco:DIR (official COCO layout).")
@click.option("--split", default="train", show_default=True, help="train / val (hub); train2017 / val2017 (coco:).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--out", default="shards", show_default=True, type=click.Path(), help="Output root; shards go to OUT/<split>/.")
@click.option("--bbox-format", type=click.Choice(["auto", "xywh", "xyxy"]), default="auto", show_default=True,
              help="How the source's bbox is written; auto decides from geometry and records the evidence.")
@click.option("--image-size", default="400", show_default=True, help="Output size: 400 or HxW.")
@click.option("--resize", type=click.Choice(["stretch", "letterbox"]), default="stretch", show_default=True)
@click.option("--min-box-size", type=float, default=1.0, show_default=True, help="Drop boxes narrower or lower than this (resized px).")
@click.option("--image-format", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality.")
@click.option("--keep-empty", is_flag=True, help="Keep images left with no boxes (all anchors negative).")
@click.option("--samples-per-shard", type=int, default=1000, show_default=True)
@click.option("--max-shard-bytes", type=int, default=None, help="Also close a shard once it reaches this many bytes.")
@click.option("--max-samples", type=int, default=None, help="Stop after this many samples (quick runs).")
@click.option("--workers", type=int, default=os.cpu_count() or 1, show_default=True, help="Worker processes (0: in-process).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where anchor targets are matched (auto: CUDA when available).")
@click.option("--gpu-batch", type=int, default=64, show_default=True, help="Images per batched GPU matching call.")
@click.option("--anchor-preset", default="frcnn-fpn", show_default=True,
              help="frcnn-fpn, detectron2-fpn, torchvision-fpn or c4.")
@click.option("--anchor-sizes", default=None, help="Override sizes per level, e.g. 32,64,128,256,512 (or 32/40,... for several).")
@click.option("--anchor-ratios", default=None, help="Override aspect ratios, e.g. 0.5,1,2 (in the preset's convention).")
@click.option("--anchor-strides", default=None, help="Override strides per level, e.g. 4,8,16,32,64.")
@click.option("--pos-iou", type=float, default=0.7, show_default=True)
@click.option("--neg-iou", type=float, default=0.3, show_default=True)
@click.option("--low-quality", type=click.Choice(["all", "argmax", "none"]), default="all", show_default=True,
              help="Forced positives per box: all ties (paper), argmax (tutorial), none.")
@click.option("--no-low-quality", is_flag=True, help="Same as --low-quality none.")
@click.option("--crowd-ignore", is_flag=True, help="Anchors covered >= half by a crowd box become ignore.")
@click.option("--ignore-cross-boundary", is_flag=True, help="Anchors leaving the image become ignore (paper's training rule).")
@click.option("--max-bad-fraction", type=float, default=0.01, show_default=True,
              help="Exit non-zero when more than this fraction of rows is skipped as bad input.")
@click.option("--retries", type=int, default=5, show_default=True,
              help="Consecutive transient source errors (dropped connection, timeout) retried before stopping.")
@click.option("--retry-backoff", type=float, default=1.0, show_default=True,
              help="Seconds before the first retry; doubles per consecutive failure (at most 60 s).")
@click.option("--overwrite", is_flag=True, help="Replace an existing build with different options.")
def build(**kw) -> None:
    """Stream a split, resize, convert boxes, match anchors and write shards + manifest (resumable)."""
    from tqdm import tqdm

    from .anchors import MatchConfig
    from .build import BuildError, BuildInterrupted, BuildOptions, build as run_build, validate_options
    from .transform import TransformConfig, parse_image_size

    try:
        image_size = parse_image_size(kw["image_size"])
        opts = BuildOptions(
            source=kw["source"], split=kw["split"], revision=kw["revision"], out=kw["out"],
            bbox_format=kw["bbox_format"],
            transform=TransformConfig(
                image_size=image_size, resize=kw["resize"], min_box_size=kw["min_box_size"],
                image_format=kw["image_format"], quality=kw["quality"], keep_empty=kw["keep_empty"],
            ),
            anchor_preset=kw["anchor_preset"], anchor_sizes=_sizes(kw["anchor_sizes"]),
            anchor_ratios=_floats(kw["anchor_ratios"], "--anchor-ratios"),
            anchor_strides=_floats(kw["anchor_strides"], "--anchor-strides"),
            matching=MatchConfig(
                pos_iou=kw["pos_iou"], neg_iou=kw["neg_iou"],
                low_quality="none" if kw["no_low_quality"] else kw["low_quality"],
                crowd_ignore=kw["crowd_ignore"], ignore_cross_boundary=kw["ignore_cross_boundary"],
            ),
            samples_per_shard=kw["samples_per_shard"], max_shard_bytes=kw["max_shard_bytes"],
            max_samples=kw["max_samples"], max_bad_fraction=kw["max_bad_fraction"],
            workers=kw["workers"], device=kw["device"], gpu_batch=kw["gpu_batch"], overwrite=kw["overwrite"],
            retries=kw["retries"], retry_backoff=kw["retry_backoff"],
        )
        validate_options(opts)  # nonsense is refused here, before any directory or process is created
    except (ValueError, TypeError, BuildError) as e:
        _fail(str(e), 2)

    bar = None  # created on the first row, so option and source errors print without a bar

    def progress(counts: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(unit="img", desc="build", dynamic_ncols=True, file=sys.stderr, initial=counts["rows"] - 1)
        bar.update(counts["rows"] - bar.n)  # rows is a running total; bar.n is the rows shown so far
        bar.set_postfix(samples=counts["samples"], shards=counts["shards"], refresh=False)

    try:
        res = run_build(opts, progress=progress)
    except BuildInterrupted as e:
        _fail(str(e), 130)
    except (BuildError, ValueError, OSError) as e:
        _fail(str(e), 1)
    finally:
        if bar is not None:
            bar.close()
    rate = res.rows / res.seconds if res.seconds > 0 else 0.0
    click.echo(f"{res.status}: {res.out_dir}")
    click.echo(f"  samples {res.samples} in {res.shards} shards, {res.bytes / 1e6:.1f} MB"
               + (f" (resumed after {res.resumed_shards} shards)" if res.resumed_shards else ""))
    click.echo(f"  rows read {res.rows}, {rate:.1f} rows/s, {res.seconds:.1f} s, anchors matched on {res.device}")
    bf = res.bbox_format
    click.echo(f"  bbox format: {bf.get('decision')} (requested {bf.get('requested')}; evidence {bf.get('evidence')})")
    click.echo(f"  images dropped: {res.drops or 'none'}")
    click.echo(f"  boxes dropped:  {res.box_drops or 'none'}")
    click.echo(f"  check it with:  frcnn-shard check {res.out_dir}")


@main.command()
@click.argument("out_dir", type=click.Path())
@click.option("--n-train", type=int, default=32, show_default=True)
@click.option("--n-val", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def sample(out_dir: str, n_train: int, n_val: int, seed: int) -> None:
    """Write the embedded synthetic sample (drawn shapes, exact boxes) as a Hub-layout folder."""
    from .sample import make_sample_hub_folder

    path = make_sample_hub_folder(out_dir, n_train=n_train, n_val=n_val, seed=seed)
    click.echo(f"sample dataset ({n_train} train, {n_val} val images, Hub layout): {path}")


@main.command()
@click.argument("shard_dir", type=click.Path())
@click.option("--deep", is_flag=True, help="Also recompute anchor targets with the reference matcher.")
@click.option("--fraction", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="With --deep: the fraction of samples to recompute.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(shard_dir: str, deep: bool, fraction: float, as_json: bool) -> None:
    """Verify shards against their manifest. Exit 0 clean, 1 problems found, 2 could not run."""
    from tqdm import tqdm

    from .check import check_shards
    from .shards import ManifestError

    bar = None if as_json else tqdm(unit="sample", desc="check", file=sys.stderr, dynamic_ncols=True)

    def progress(n: int) -> None:
        if bar is not None:
            bar.update(n)

    try:
        report = check_shards(shard_dir, deep=deep, fraction=fraction, progress=progress)
    except (ManifestError, OSError) as e:
        if bar is not None:
            bar.close()
        _fail(str(e), 2)
    if bar is not None:
        bar.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            click.echo(str(p))
        click.echo(report.summary_line())
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("shard_dir", type=click.Path())
def info(shard_dir: str) -> None:
    """A short table from the manifest: source, options, counts, drops, bbox format, anchors."""
    from .check import info_rows
    from .shards import ManifestError, read_manifest

    try:
        manifest = read_manifest(shard_dir)
    except ManifestError as e:
        _fail(str(e), 2)
    rows = info_rows(manifest)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail("plots need matplotlib: pip install 'frcnn-shard[viz]' (make install includes it)", 2)


@main.command()
@click.argument("shard_dir", type=click.Path())
@click.option("--out", default="stats.png", show_default=True, type=click.Path(), help="PNG figure to write.")
@click.option("--limit", type=int, default=None, help="Only the first N samples.")
@click.option("--top", type=int, default=20, show_default=True, help="Classes shown in the bar chart.")
def stats(shard_dir: str, out: str, limit: int | None, top: int) -> None:
    """Class distribution, boxes per image, box sizes and anchor labels, as a table and a PNG."""
    _need_matplotlib()
    from .shards import ManifestError
    from .viz import compute_stats, plot_stats, stats_table

    try:
        st = compute_stats(shard_dir, limit=limit)
    except ManifestError as e:
        _fail(str(e), 2)
    click.echo(stats_table(st, top=top))
    plot_stats(st, out, top=top)
    click.echo(f"figure: {out}")


@main.command()
@click.argument("shard_dir", type=click.Path())
@click.option("--key", "keys", multiple=True, help="Sample key (zero-padded image id); repeatable.")
@click.option("--index", "indices", type=int, multiple=True, help="Sample position in the split; repeatable.")
@click.option("--anchors", "with_anchors", is_flag=True, help="Also draw the positive anchors.")
@click.option("--out", default="sample.png", show_default=True, type=click.Path(), help="PNG to write.")
def show(shard_dir: str, keys: tuple, indices: tuple, with_anchors: bool, out: str) -> None:
    """Draw samples with their boxes and class names (and positive anchors) into one PNG grid."""
    _need_matplotlib()
    from .shards import ManifestError
    from .viz import render_samples

    if not keys and not indices:
        _fail("give at least one --key or --index", 2)
    import tarfile

    from PIL import Image

    try:
        shown = render_samples(shard_dir, keys=list(keys), indices=list(indices), anchors=with_anchors, out=out)
    except (ManifestError, KeyError, IndexError) as e:
        _fail(str(e).strip("'\""), 2)
    except (ValueError, OSError, tarfile.TarError, Image.DecompressionBombError) as e:
        # Shards from elsewhere: a refused member (ShardFormatError), a broken tar or image.
        _fail(f"{type(e).__name__}: {e}", 2)
    click.echo(f"{out}: {', '.join(shown)}")


if __name__ == "__main__":
    main()
