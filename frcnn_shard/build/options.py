"""What a build takes: BuildOptions, the parsers of their command-line text, their validation, the device choice.

cli.py builds `frcnn-shard build`'s options from BuildOptions' fields (a field's ``help`` makes it an
option); validate_options refuses nonsense before anything is created.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .. import anchors as anc
from ..errors import OptionError
from ..sources import BBOX_FORMAT_CHOICES, DEFAULT_HUB_ID, HUB_CROWD_CHOICES
from ..storage import StorageError, open_store
from ..format.canvas import largest_canvas
from ..transform import KEEP_RATIO, TransformConfig

DEVICES = ("auto", "cpu", "cuda")  # where anchor targets are matched
ENGINES = ("local", "ray")  # what runs the parts (build.engines holds the table)
_PART_ENV = (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE"))
# The device nodes through which a GPU reaches a Linux process (NVIDIA, Jetson, WSL2, ROCm): without
# any of them torch.cuda.is_available() is False, and asking torch costs its import (1.5-2 s).
_GPU_DEVICE_NODES = ("/dev/nvidia*", "/dev/nvgpu*", "/dev/nvhost-*", "/dev/nvmap", "/dev/dxg", "/dev/kfd")


def parse_storage_options(text: str) -> dict:
    """The --storage-options JSON object (ValueError when it is not one; the values are never echoed)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"must be a JSON object ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got a {type(value).__name__}")
    return value


def parse_classes(text: str) -> tuple[str, ...]:
    """'person,car' -> ('person', 'car'): class names, comma-separated (ValueError on an empty or repeated one)."""
    names = tuple(n.strip() for n in str(text).split(","))
    if not all(names):
        raise ValueError(f"must be class names separated by commas, none empty (got {text!r})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"names {repeated} more than once")
    return names


def parse_part(text: str, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """'3/16' -> (3, 16); 'auto' reads SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else RANK/WORLD_SIZE (ValueError)."""
    if text == "auto":
        for index_var, count_var in _PART_ENV:
            if index_var in env and count_var in env:
                return parse_part(f"{env[index_var]}/{env[count_var]}")
        raise ValueError("is auto, but neither SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT nor RANK/WORLD_SIZE is set")
    index, sep, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"must be I/N (e.g. 3/16) or auto, got {text!r}") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"must be I/N with 0 <= I < N, got {text!r}")
    return i, n


@dataclass(frozen=True)
class BuildOptions:
    """Everything `frcnn-shard build` takes; the output-shaping part is recorded in the manifest."""

    # A field's "help" is its documentation and makes it a command-line option (cli.py builds the
    # options from these fields); "choices" and "parse" say how the option's text is read.
    source: str = field(default=DEFAULT_HUB_ID, metadata={
        "help": "Hub dataset id, a local folder in the Hub's layout, or coco:DIR (official COCO layout)."})
    split: str = field(default="train", metadata={"help": "train / val (hub); train2017 / val2017 (coco:)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit).", "type": str})
    image_dir: str | None = field(default=None, metadata={
        "help": "The images of a coco:FILE.json source (default: the json's own folder).", "type": str})
    classes: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Keep only these classes, in this order, as labels 1..K (e.g. person,car); other boxes drop as "
                "excluded_class. Default: every class of the source.", "parse": parse_classes})
    hub_crowd: str = field(default="auto", metadata={
        "help": "auto: on a Hub source with COCO's classes and COCO's annotation ids, ids >= 9e11 are crowd "
                "boxes (the Hub drops iscrowd); off: every Hub box is an ordinary box.", "choices": HUB_CROWD_CHOICES})
    out: str = field(default="shards", metadata={"help": "Output root; shards go to OUT/<split>/."})
    bbox_format: str = field(default="auto", metadata={
        "help": "How the source's bbox is written; auto decides from geometry and records the evidence.",
        "choices": BBOX_FORMAT_CHOICES})
    transform: TransformConfig = field(default_factory=TransformConfig)
    anchor_preset: str = field(default=anc.DEFAULT_PRESET, metadata={
        "help": "The anchor layout (docs/FORMAT.md lists each preset's sizes, ratios and strides).",
        "choices": anc.PRESETS})
    anchor_sizes: tuple | None = field(default=None, metadata={
        "help": "Override sizes per level, e.g. 32,64,128,256,512 (or 32/40,... for several).", "parse": anc.parse_sizes})
    anchor_ratios: tuple | None = field(default=None, metadata={
        "help": "Override aspect ratios, e.g. 0.5,1,2 (in the preset's convention).", "parse": anc.parse_numbers})
    anchor_strides: tuple | None = field(default=None, metadata={
        "help": "Override strides per level, e.g. 4,8,16,32,64.", "parse": anc.parse_numbers})
    matching: anc.MatchConfig = field(default_factory=anc.MatchConfig)
    flip_targets: bool = field(default=True, metadata={
        "help": "Also store the anchor targets of the horizontally mirrored image, for the loader's hflip "
                "(a few hundred bytes per sample, docs/BENCHMARKS.md)."})
    rows_per_shard: int = field(default=1000, metadata={
        "help": "Source rows per shard: shard i holds the kept samples of rows [i*N, (i+1)*N), so every way of "
                "running the build writes the same shards."})
    max_rows: int | None = field(default=None, metadata={
        "help": "Build only the first N rows of the split (quick runs).", "type": int})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "Exit non-zero when more than this fraction of rows is skipped as bad input."})
    workers: int = field(default_factory=lambda: os.cpu_count() or 1, metadata={
        "help": "Worker processes (0: in-process)."})
    device: str = field(default="auto", metadata={
        "help": "Where anchor targets are matched (auto: CUDA when available).", "choices": DEVICES})
    gpu_batch: int = field(default=64, metadata={"help": "Images per batched GPU matching call."})
    chunk_size: int = 8  # rows per task sent to a worker
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing build with different options."})
    detect_rows: int = 200  # rows examined to decide the bbox format
    retries: int = field(default=5, metadata={
        "help": "Consecutive transient source errors (dropped connection, timeout) retried before stopping."})
    retry_backoff: float = field(default=1.0, metadata={
        "help": "Seconds before the first retry; doubles per consecutive failure (at most 60 s)."})
    part: tuple[int, int] | None = field(default=None, metadata={
        "help": "Build only part I of N (0 <= I < N), e.g. 3/16, or auto (SLURM_ARRAY_TASK_ID/COUNT, else "
                "RANK/WORLD_SIZE); run `frcnn-shard merge` once every part is done.", "parse": parse_part})
    engine: str = field(default="local", metadata={
        "help": "local: this machine; ray: the parts as Ray tasks on a cluster (RAY_ADDRESS or --ray-address, "
                "else a local one), merged at the end.", "choices": ENGINES})
    ray_address: str | None = field(default=None, metadata={"help": "The Ray cluster to use (default: RAY_ADDRESS).",
                                                            "type": str})
    storage_options: dict | None = field(default=None, metadata={
        "help": "JSON object of fsspec options for --out (e.g. endpoint, profile); secrets are never logged or "
                "recorded. The standard AWS_* settings work without it.", "parse": parse_storage_options})


def _gpu_may_be_visible() -> bool:
    """False only where torch cannot see a GPU: Linux without any GPU device node."""
    if not sys.platform.startswith("linux"):
        return True
    return any(glob.glob(pattern) for pattern in _GPU_DEVICE_NODES)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error.

    'auto' asks torch only where a GPU device node exists, so a CPU-only build never imports torch.
    """
    if device not in DEVICES:
        raise OptionError("device", f"must be one of {', '.join(DEVICES)} (got {device!r})")
    if device == "cpu" or (device == "auto" and not _gpu_may_be_visible()):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise OptionError("device", f"is cuda, but torch {torch.__version__} sees no CUDA device "
                          "(use auto or cpu to match anchors on the CPU)")
    return "cpu"


def canvas_bound(opts: BuildOptions) -> tuple[int, int]:
    """The build's canvas: its image size, or for keep-ratio the largest canvas a sample can have."""
    if opts.transform.resize == KEEP_RATIO:
        return largest_canvas(opts.transform.max_size)
    return opts.transform.image_size


def anchor_spec(opts: BuildOptions) -> anc.AnchorSpec:
    """The anchor spec of a build: the preset at the build's canvas (canvas_bound), custom values applied.
    A keep-ratio sample's anchors are this spec at its own canvas (``AnchorSpec.at``)."""
    return anc.preset_spec(
        opts.anchor_preset, canvas_bound(opts),
        sizes=opts.anchor_sizes, ratios=opts.anchor_ratios, strides=opts.anchor_strides,
    )


def _check_local_out(out: Path) -> None:
    """A local output root must be (or be creatable as) a directory."""
    if out.exists() and not out.is_dir():
        raise OptionError("out", f"{out} exists and is not a directory")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError("out", f"{out}: {parent} is a file, not a directory")


def validate_options(opts: BuildOptions) -> None:
    """Refuse nonsensical options before any work starts (raises OptionError; nothing is created)."""
    at_least = [("rows_per_shard", 1), ("max_rows", 1), ("workers", 0), ("chunk_size", 1), ("gpu_batch", 1),
                ("retries", 0)]
    for name, low in at_least:
        value = getattr(opts, name)
        if value is not None and value < low:
            raise OptionError(name, f"must be >= {low} (got {value})")
    if not 0.0 <= opts.max_bad_fraction <= 1.0:
        raise OptionError("max_bad_fraction", f"must be within 0..1 (got {opts.max_bad_fraction})")
    if not (math.isfinite(opts.retry_backoff) and opts.retry_backoff >= 0):
        raise OptionError("retry_backoff", f"must be a finite number >= 0 (got {opts.retry_backoff})")
    if opts.device not in DEVICES:
        raise OptionError("device", f"must be one of {', '.join(DEVICES)} (got {opts.device!r})")
    if opts.device != "auto" and opts.engine != "ray":  # auto falls back to the CPU; cuda asks torch (Ray: the cluster)
        resolve_device(opts.device)
    if opts.part is not None and not (len(opts.part) == 2 and 0 <= opts.part[0] < opts.part[1]):
        raise OptionError("part", f"must be (I, N) with 0 <= I < N (got {opts.part!r})")
    if opts.engine not in ENGINES:
        raise OptionError("engine", f"must be one of {', '.join(ENGINES)} (got {opts.engine!r})")
    if opts.engine == "ray" and opts.part is not None:
        raise OptionError("part", "and engine ray exclude each other: the Ray engine runs every part itself")
    try:
        store = open_store(opts.out, opts.storage_options)
    except StorageError as e:
        raise OptionError("out", str(e)) from None
    if store.is_local:
        _check_local_out(Path(store.path))
    try:
        anchor_spec(opts)  # an unknown preset or impossible custom anchors
    except (ValueError, TypeError, KeyError) as e:
        raise OptionError("anchor_preset", f"(or the anchor sizes, ratios, strides): {e}") from None
