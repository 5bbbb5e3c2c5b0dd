"""The `frcnn-shard` command: parses options, calls library functions, prints. Nothing else lives here."""
from __future__ import annotations

import json
import os
import re
import sys
import tarfile
import zipfile
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import Callable, Iterator

import click

from . import __version__
from .anchors import MatchConfig
from .build import BuildOptions
from .transform import TransformConfig


def _fail(message: str, code: int = 1) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


# What reading a split folder raises on malformed input: the library's errors (ManifestError, ShardFormatError,
# RecordError, StorageError, LoaderError are ValueErrors), the file system's, and the decoders' own types.
_INPUT_ERRORS = (ValueError, OSError, tarfile.TarError, zipfile.BadZipFile, RecursionError, MemoryError)


@contextmanager
def _refusing_bad_input(code: int = 2) -> Iterator[None]:
    """Malformed input ends the command with its message (which names the file or sample and the rule) and
    ``code``, never a traceback."""
    from PIL import Image

    try:
        yield
    except (*_INPUT_ERRORS, Image.DecompressionBombError) as e:
        from .shards import ManifestError

        _fail(str(e) if isinstance(e, ManifestError) else f"{type(e).__name__}: {e}", code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="frcnn-shard")
def main() -> None:
    """Preprocess COCO into WebDataset shards with precomputed RPN anchor targets, and inspect them."""


def _flag(option: str) -> str:
    """A BuildOptions field name as the command-line flag that sets it."""
    return "--" + option.replace("_", "-")


# The build's options are the fields of these dataclasses that carry a "help": their defaults,
# choices and help text live there, once; the command line only spells them as flags.
_OPTION_CLASSES = (BuildOptions, TransformConfig, MatchConfig)


def _option_fields(cls) -> list:
    return [f for f in fields(cls) if "help" in f.metadata]


def _default_text(value) -> str | None:
    """How a tuple default reads on the command line: (400, 400) -> '400', (480, 640) -> '480x640'."""
    if isinstance(value, tuple):
        return str(value[0]) if len(set(value)) == 1 else "x".join(map(str, value))
    return None if value is None else str(value)


def _click_option(f) -> Callable:
    """The click option of one dataclass field."""
    meta = f.metadata
    default = f.default_factory() if f.default is MISSING else f.default
    if isinstance(default, bool):
        # A switch that is on by default needs its "off" spelling: --flip-targets/--no-flip-targets.
        flag = _flag(f.name) + (f"/--no-{_flag(f.name)[2:]}" if default else "")
        return click.option(flag, f.name, is_flag=True, default=default, show_default=default, help=meta["help"])
    if "parse" in meta:  # read as text, parsed into the field's value by _values
        text = _default_text(default)
        return click.option(_flag(f.name), default=text, show_default=text is not None, help=meta["help"])
    kind = click.Choice(meta["choices"]) if "choices" in meta else meta.get("type", type(default))
    return click.option(_flag(f.name), type=kind, default=default, show_default=default is not None, help=meta["help"])


def _build_command_options(command: Callable) -> Callable:
    """Decorate the build command with one option per documented field of the option classes."""
    for f in reversed([f for cls in _OPTION_CLASSES for f in _option_fields(cls)]):
        command = _click_option(f)(command)
    return command


def _values(cls, kw: dict) -> dict:
    """The given values of a dataclass's option fields, parsed (ValueError names the field)."""
    out = {}
    for f in _option_fields(cls):
        value = kw[f.name]
        if "parse" in f.metadata:
            if value is None:
                continue  # not given: the library's default
            try:
                value = f.metadata["parse"](value)
            except ValueError as e:
                raise ValueError(f"{_flag(f.name)}: {e}") from None
        out[f.name] = value
    return out


# The library names options by their Python names; on the command line they read as flags. A bare
# word is taken for an option only when it has an underscore ("quality" alone may be prose).
_OPTION_NAMES = re.compile(
    r"\b(?:(?:TransformConfig|MatchConfig|BuildOptions)\.(" + "|".join(
        f.name for cls in _OPTION_CLASSES for f in _option_fields(cls)) + r")|(" + "|".join(
        f.name for cls in _OPTION_CLASSES for f in fields(cls) if "_" in f.name) + r"))\b")


def _cli_words(message: str) -> str:
    """A library message with its option names written as the flags that set them."""
    return (_OPTION_NAMES.sub(lambda m: _flag(m.group(1) or m.group(2)), message)
            .replace("the overwrite option", "--overwrite"))


@main.command()
@_build_command_options
@click.option("--no-low-quality", is_flag=True, help="Same as --low-quality none.")
def build(no_low_quality: bool, **kw) -> None:
    """Stream a split, resize, convert boxes, match anchors and write shards + manifest (resumable)."""
    # A Hub source's `datasets` imports torch (1.5-2 s) only to offer torch-formatted rows, which the
    # build never asks for: this process does without (a USE_TORCH already set is respected).
    os.environ.setdefault("USE_TORCH", "0")
    from .build import BuildError, BuildInterrupted, OptionError, build as run_build, validate_options
    from .errors import SourceFormError
    from .format.classes import ClassMapError

    try:
        if no_low_quality:
            kw["low_quality"] = "none"
        opts = BuildOptions(**_values(BuildOptions, kw), transform=TransformConfig(**_values(TransformConfig, kw)),
                            matching=MatchConfig(**_values(MatchConfig, kw)))
        validate_options(opts)  # nonsense is refused here, before any directory or process is created
    except OptionError as e:
        _fail(f"{_flag(e.option)} {_cli_words(e.reason)}", 2)
    except (ValueError, TypeError, BuildError) as e:
        _fail(_cli_words(str(e)), 2)
    bar = _Bar("build", "row")
    try:
        res = run_build(opts, progress=lambda c: bar.update(c["rows"], total=c["rows_total"], samples=c["samples"],
                                                            shards=f"{c['shards']}/{c['shards_total']}"))
    except BuildInterrupted as e:
        bar.close()
        _fail(_cli_words(str(e)), 128 + e.signum)
    except (SourceFormError, ClassMapError) as e:  # the source is none we read, or breaks a rule: bad input
        bar.close()
        _fail(_cli_words(str(e)), 2)
    except (BuildError, ValueError, OSError) as e:
        bar.close()
        _fail(_cli_words(str(e)), 1)
    bar.close()
    _print_build_summary(res)


@main.command()
@click.argument("split_dir")
@click.option("--storage-options", default=None, help="JSON object of fsspec options for SPLIT_DIR.")
def merge(split_dir: str, storage_options: str | None) -> None:
    """Once every part of a build is done: check the parts, then write drops.jsonl and the manifest."""
    from .build import BuildError, PartRecordError, merge_split, parse_storage_options

    try:
        res = merge_split(split_dir, parse_storage_options(storage_options) if storage_options else None)
    except PartRecordError as e:  # a malformed part record: bad input, like a malformed manifest
        _fail(_cli_words(str(e)), 2)
    except (BuildError, ValueError, OSError) as e:
        _fail(_cli_words(str(e)), 1)
    _print_build_summary(res)


class _Bar:
    """A tqdm bar on stderr, created at the first update (so errors before any row print without one)."""

    def __init__(self, desc: str, unit: str, total: int | None = None):
        self.desc, self.unit, self.total, self.bar = desc, unit, total, None

    def update(self, done: int, total: int | None = None, **postfix) -> None:
        """Show ``done`` (a running total) of ``total`` (when known: then tqdm shows the rate and an ETA)."""
        from tqdm import tqdm

        if total is not None:
            self.total = total
        if self.bar is None:
            self.bar = tqdm(unit=self.unit, desc=self.desc, total=self.total, dynamic_ncols=True, file=sys.stderr,
                            initial=max(done - 1, 0))
        elif self.bar.total != self.total:
            self.bar.total = self.total
        self.bar.update(done - self.bar.n)
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)

    def close(self) -> None:
        """Finish the bar, if one was shown."""
        if self.bar is not None:
            self.bar.close()


def _print_build_summary(res) -> None:
    from .inspect.info import bbox_format_text
    from .words import human_bytes, plural

    rate = res.rows_read / res.seconds if res.seconds > 0 else 0.0  # only the rows this run read
    what = f"part {res.part[0]} of {res.part[1]}" if res.part else "split"
    click.echo(f"{res.status} ({what}): {res.out_dir}")
    click.echo(f"  {plural(res.samples, 'sample')} in {plural(res.shards, 'shard')}, {human_bytes(res.bytes)}"
               + (f" (resumed after {plural(res.resumed_shards, 'shard')})" if res.resumed_shards else ""))
    click.echo(f"  {plural(res.rows_read, 'row')} read, {rate:.1f} rows/s, {res.seconds:.1f} s, "
               f"anchors matched on {res.device}")
    click.echo(f"  bbox format: {bbox_format_text(res.bbox_format)}")
    click.echo(f"  images dropped: {res.drops or 'none'}")
    for d in res.dropped:
        click.echo(f"    row {d['row']} (image id {d['image_id']}): {d['reason']}: {d['detail']}")
    if res.dropped:
        click.echo(f"    every dropped row: {res.drops_file}")
    click.echo(f"  boxes dropped:  {res.box_drops or 'none'}")
    if res.part:
        click.echo(f"  when every part is done:  frcnn-shard merge {res.out_dir}")
    else:
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
    from .inspect.check import check_shards

    bar = _Bar("check", "sample")
    try:
        with _refusing_bad_input():
            report = check_shards(shard_dir, deep=deep, fraction=fraction, progress=None if as_json else bar.update)
    finally:
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
    from .shards import read_manifest

    with _refusing_bad_input():
        rows = info_rows(read_manifest(shard_dir))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")


@main.command("coco-gt")
@click.argument("split_dir")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="COCO annotations json to write.")
@click.option("--storage-options", default=None, help="JSON object of fsspec options for SPLIT_DIR.")
def coco_gt(split_dir: str, out: str, storage_options: str | None) -> None:
    """Write a split's ground truth as a COCO annotations json (original pixels, the build's category ids)."""
    from .build import parse_storage_options
    from .coco_eval import write_coco_ground_truth

    try:
        options = parse_storage_options(storage_options) if storage_options else None
    except ValueError as e:
        _fail(f"--storage-options {e}", 2)
    with _refusing_bad_input():  # a broken manifest, shard or record (ShardFormatError, RecordError), or the output
        counts = write_coco_ground_truth(split_dir, out, options)
    click.echo(f"{out}: {counts['images']} images, {counts['annotations']} annotations ({counts['crowd']} crowd, "
               f"iscrowd=1), {counts['categories']} categories (the manifest's ids); boxes in original pixels, "
               "area = box area")


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
    from .inspect.stats import compute_stats, plot_stats, stats_table

    bar = _Bar("stats", "sample")
    try:
        with _refusing_bad_input():
            st = compute_stats(shard_dir, limit=limit, progress=bar.update)
    finally:
        bar.close()
    click.echo(stats_table(st, top=top))
    plot_stats(st, out, top=top)
    click.echo(f"figure: {out}")


@main.command()
@click.argument("shard_dir", type=click.Path())
@click.option("--key", "keys", multiple=True, help="Sample key (zero-padded image id); repeatable.")
@click.option("--index", "indices", type=int, multiple=True, help="Sample position in the split; repeatable.")
@click.option("--anchors", "with_anchors", is_flag=True, help="Also draw the positive anchors.")
@click.option("--flip", is_flag=True, help="Draw the samples mirrored, as the loader's hflip delivers them "
                                           "(flipped boxes and the flipped targets' anchors).")
@click.option("--out", default="sample.png", show_default=True, type=click.Path(), help="PNG to write.")
def show(shard_dir: str, keys: tuple, indices: tuple, with_anchors: bool, flip: bool, out: str) -> None:
    """Draw samples with their boxes and class names (and positive anchors) into one PNG grid."""
    _need_matplotlib()
    from .inspect.show import render_samples

    if not keys and not indices:
        _fail("give at least one --key or --index", 2)
    try:
        with _refusing_bad_input():  # shards from elsewhere: a refused member, a broken tar, record or image
            shown = render_samples(shard_dir, keys=list(keys), indices=list(indices), anchors=with_anchors, out=out,
                                   flip=flip)
    except (KeyError, IndexError) as e:  # no such key or index in the split
        _fail(str(e).strip("'\""), 2)
    click.echo(f"{out}: {', '.join(shown)}")


if __name__ == "__main__":
    main()
