"""The `frcnn-shard` command: parses options, calls library functions, prints. Nothing else lives here."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import fields

import click

from . import __version__
from .anchors import LOW_QUALITY_MODES, PRESETS, MatchConfig
from .build import DEVICES, BuildOptions
from .sources import BBOX_FORMAT_CHOICES
from .transform import IMAGE_FORMATS, RESIZE_MODES, TransformConfig, parse_image_size


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


# Defaults and choices come from the library's own dataclasses and constants: one place each.
_B, _T, _M = BuildOptions(), TransformConfig(), MatchConfig()


def _flag(option: str) -> str:
    """A BuildOptions field name as the command-line flag that sets it."""
    return "--" + option.replace("_", "-")


# The library names options by their Python names; on the command line they read as flags.
_OPTION_NAMES = re.compile(r"\b(?:TransformConfig\.|MatchConfig\.|BuildOptions\.)?(" + "|".join(
    f.name for cls in (BuildOptions, TransformConfig, MatchConfig) for f in fields(cls) if "_" in f.name) + r")\b")


def _cli_words(message: str) -> str:
    """A library message with its option names written as the flags that set them."""
    return _OPTION_NAMES.sub(lambda m: _flag(m.group(1)), message).replace("the overwrite option", "--overwrite")


@main.command()
@click.option("--source", default=_B.source, show_default=True,
              help="Hub dataset id, a local folder in the Hub's layout, or coco:DIR (official COCO layout).")
@click.option("--split", default=_B.split, show_default=True, help="train / val (hub); train2017 / val2017 (coco:).")
@click.option("--revision", default=_B.revision, help="Hub revision (branch, tag or commit).")
@click.option("--out", default=_B.out, show_default=True, type=click.Path(), help="Output root; shards go to OUT/<split>/.")
@click.option("--bbox-format", type=click.Choice(BBOX_FORMAT_CHOICES), default=_B.bbox_format, show_default=True,
              help="How the source's bbox is written; auto decides from geometry and records the evidence.")
@click.option("--image-size", default=str(_T.image_size[0]) if _T.image_size[0] == _T.image_size[1]
              else "x".join(map(str, _T.image_size)), show_default=True, help="Output size: 400 or HxW.")
@click.option("--resize", type=click.Choice(RESIZE_MODES), default=_T.resize, show_default=True,
              help="stretch: fill the canvas (aspect not kept, as the reference model); "
                   "letterbox: keep the aspect, pad bottom and right with zeros.")
@click.option("--min-box-size", type=float, default=_T.min_box_size, show_default=True,
              help="Drop boxes narrower or lower than this (resized px).")
@click.option("--image-format", type=click.Choice(IMAGE_FORMATS), default=_T.image_format, show_default=True,
              help="How the resized images are stored: jpg (small, re-encoded) or png (lossless, ~10x larger).")
@click.option("--quality", type=click.IntRange(1, 100), default=_T.quality, show_default=True, help="JPEG quality.")
@click.option("--keep-empty", is_flag=True, help="Keep images left with no boxes (all anchors negative).")
@click.option("--samples-per-shard", type=int, default=_B.samples_per_shard, show_default=True,
              help="Samples per shard file (the last holds the rest).")
@click.option("--max-shard-bytes", type=int, default=_B.max_shard_bytes, help="Also close a shard once it reaches this many bytes.")
@click.option("--max-samples", type=int, default=_B.max_samples, help="Stop after this many samples (quick runs).")
@click.option("--workers", type=int, default=_B.workers, show_default=True, help="Worker processes (0: in-process).")
@click.option("--device", type=click.Choice(DEVICES), default=_B.device, show_default=True,
              help="Where anchor targets are matched (auto: CUDA when available).")
@click.option("--gpu-batch", type=int, default=_B.gpu_batch, show_default=True, help="Images per batched GPU matching call.")
@click.option("--anchor-preset", type=click.Choice(PRESETS), default=_B.anchor_preset, show_default=True,
              help="The anchor layout (docs/FORMAT.md lists each preset's sizes, ratios and strides).")
@click.option("--anchor-sizes", default=None, help="Override sizes per level, e.g. 32,64,128,256,512 (or 32/40,... for several).")
@click.option("--anchor-ratios", default=None, help="Override aspect ratios, e.g. 0.5,1,2 (in the preset's convention).")
@click.option("--anchor-strides", default=None, help="Override strides per level, e.g. 4,8,16,32,64.")
@click.option("--pos-iou", type=float, default=_M.pos_iou, show_default=True,
              help="An anchor whose best IoU with a box is at least this is positive.")
@click.option("--neg-iou", type=float, default=_M.neg_iou, show_default=True,
              help="An anchor whose best IoU is below this is negative; in between it is ignored.")
@click.option("--low-quality", type=click.Choice(LOW_QUALITY_MODES), default=_M.low_quality, show_default=True,
              help="Forced positives per box: all ties (paper), argmax (tutorial), none.")
@click.option("--no-low-quality", is_flag=True, help="Same as --low-quality none.")
@click.option("--crowd-ignore", is_flag=True, help="Anchors covered >= half by a crowd box become ignore.")
@click.option("--ignore-cross-boundary", is_flag=True, help="Anchors leaving the image become ignore (paper's training rule).")
@click.option("--max-bad-fraction", type=float, default=_B.max_bad_fraction, show_default=True,
              help="Exit non-zero when more than this fraction of rows is skipped as bad input.")
@click.option("--retries", type=int, default=_B.retries, show_default=True,
              help="Consecutive transient source errors (dropped connection, timeout) retried before stopping.")
@click.option("--retry-backoff", type=float, default=_B.retry_backoff, show_default=True,
              help="Seconds before the first retry; doubles per consecutive failure (at most 60 s).")
@click.option("--overwrite", is_flag=True, help="Replace an existing build with different options.")
def build(**kw) -> None:
    """Stream a split, resize, convert boxes, match anchors and write shards + manifest (resumable)."""
    from .build import BuildError, BuildInterrupted, OptionError, build as run_build, validate_options

    try:
        opts = _build_options(kw)
        validate_options(opts)  # nonsense is refused here, before any directory or process is created
    except OptionError as e:
        _fail(f"{_flag(e.option)} {_cli_words(e.reason)}", 2)
    except (ValueError, TypeError, BuildError) as e:
        _fail(_cli_words(str(e)), 2)
    bar = _Bar("build", "img")
    try:
        res = run_build(opts, progress=lambda c: bar.update(c["rows"], samples=c["samples"], shards=c["shards"]))
    except BuildInterrupted as e:
        _fail(_cli_words(str(e)), 130)
    except (BuildError, ValueError, OSError) as e:
        _fail(_cli_words(str(e)), 1)
    finally:
        bar.close()
    _print_build_summary(res)


def _build_options(kw: dict) -> BuildOptions:
    """BuildOptions from the build command's parsed options (ValueError on a malformed value)."""
    return BuildOptions(
        source=kw["source"], split=kw["split"], revision=kw["revision"], out=kw["out"], bbox_format=kw["bbox_format"],
        transform=TransformConfig(
            image_size=parse_image_size(kw["image_size"]), resize=kw["resize"], min_box_size=kw["min_box_size"],
            image_format=kw["image_format"], quality=kw["quality"], keep_empty=kw["keep_empty"],
        ),
        anchor_preset=kw["anchor_preset"], anchor_sizes=_sizes(kw["anchor_sizes"]),
        anchor_ratios=_floats(kw["anchor_ratios"], "--anchor-ratios"),
        anchor_strides=_floats(kw["anchor_strides"], "--anchor-strides"),
        matching=MatchConfig(
            pos_iou=kw["pos_iou"], neg_iou=kw["neg_iou"], low_quality="none" if kw["no_low_quality"] else kw["low_quality"],
            crowd_ignore=kw["crowd_ignore"], ignore_cross_boundary=kw["ignore_cross_boundary"],
        ),
        samples_per_shard=kw["samples_per_shard"], max_shard_bytes=kw["max_shard_bytes"],
        max_samples=kw["max_samples"], max_bad_fraction=kw["max_bad_fraction"], workers=kw["workers"],
        device=kw["device"], gpu_batch=kw["gpu_batch"], overwrite=kw["overwrite"], retries=kw["retries"],
        retry_backoff=kw["retry_backoff"],
    )


class _Bar:
    """A tqdm bar on stderr, created at the first update (so errors before any row print without one)."""

    def __init__(self, desc: str, unit: str, total: int | None = None):
        self.desc, self.unit, self.total, self.bar = desc, unit, total, None

    def update(self, done: int, **postfix) -> None:
        """Show ``done`` (a running total) and the postfix counters."""
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(unit=self.unit, desc=self.desc, total=self.total, dynamic_ncols=True, file=sys.stderr,
                            initial=max(done - 1, 0))
        self.bar.update(done - self.bar.n)
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)

    def close(self) -> None:
        """Finish the bar, if one was shown."""
        if self.bar is not None:
            self.bar.close()


def _print_build_summary(res) -> None:
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
    from .sources.fixtures import make_sample_hub_folder

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

    from .inspect.check import check_shards
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
    from .inspect.info import info_rows
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
    from .inspect.stats import compute_stats, plot_stats, stats_table

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
    from .inspect.show import render_samples

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
