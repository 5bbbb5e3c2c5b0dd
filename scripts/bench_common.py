"""Shared helpers for scripts/bench_build.py and scripts/bench_loader.py.

- benchmark data: tiny_coco (50 real COCO images) repeated into a Hub-layout folder under the git-ignored
  ``bench_data/`` (cached between runs), and shards built from it (cached too);
- machine description, timing, markdown tables, and the section updater for docs/BENCHMARKS.md;
- process-tree memory sampling (Rss / Pss summed over a process and its descendants).

The machine these run on is usually shared and noisy: every table reports ratios measured in the same
run, and absolute numbers are only indications.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_COCO = ROOT.parent / "shared" / "data" / "tiny_coco"
# git-ignored; FRCNN_SHARD_BENCH_DATA moves it (tests/test_scripts.py runs every script on a tiny input elsewhere)
BENCH_DATA = Path(os.environ.get("FRCNN_SHARD_BENCH_DATA") or ROOT / "bench_data")
BENCH_MD = ROOT / "docs" / "BENCHMARKS.md"
ID_STRIDE = 1_000_000  # repeat k of image i gets image id i + k * ID_STRIDE (COCO ids are < 600k)
SAMPLES_PER_SHARD = 250  # so 2,000 images give 8 shards: enough streams for several loader workers


# ------------------------------------------------------------------------------------- data


def require_tiny_coco() -> Path:
    """The 50-image COCO slice, or exit with a message saying where it was expected."""
    if not (TINY_COCO / "annotations" / "instances_train2017.json").exists():
        raise SystemExit(f"benchmark input not found: {TINY_COCO} (expected ../shared/data/tiny_coco)")
    return TINY_COCO


def repeated_hub_rows(n_images: int) -> Iterator[dict]:
    """tiny_coco's Hub-shaped rows repeated to n_images, with unique image and bbox ids per repeat."""
    from frcnn_shard.sources.fixtures import coco_to_hub_rows

    base = list(coco_to_hub_rows(require_tiny_coco(), "train2017"))
    for i in range(n_images):
        k, row = divmod(i, len(base))
        r = base[row]
        objects = dict(r["objects"])
        objects["bbox_id"] = [b + k * ID_STRIDE * 10 for b in objects["bbox_id"]]
        yield {**r, "image_id": r["image_id"] + k * ID_STRIDE, "objects": objects}


def hub_folder(n_images: int) -> Path:
    """A Hub-layout folder of tiny_coco repeated to n_images (split "train"), written once and cached."""
    from frcnn_shard.sources.fixtures import write_hub_folder

    out = BENCH_DATA / f"hub_{n_images}"
    if (out / "README.md").exists():
        return out
    tmp = BENCH_DATA / f".hub_{n_images}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"writing {n_images}-image Hub folder {out} (once; cached)")
    write_hub_folder(tmp, {"train": repeated_hub_rows(n_images)}, rows_per_file=500)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def shard_dir(n_images: int, workers: int | None = None) -> Path:
    """Shards (split "train") of hub_folder(n_images) with default build options, built once and cached."""
    from frcnn_shard.build import BuildOptions, build
    from frcnn_shard.format import FORMAT_VERSION
    from frcnn_shard.shards import MANIFEST_NAME, ManifestError, read_manifest

    out = BENCH_DATA / f"shards_{n_images}"
    split_dir = out / "train"
    try:
        cached = read_manifest(split_dir) if (split_dir / MANIFEST_NAME).exists() else {}
    except ManifestError:  # another major format version: rebuilt below
        cached = {}
    if cached.get("complete") and cached.get("format_version") == FORMAT_VERSION:
        return split_dir
    src = hub_folder(n_images)
    log(f"building shards of {src} into {out} (once; cached)")
    build(BuildOptions(source=str(src), split="train", out=str(out), rows_per_shard=SAMPLES_PER_SHARD,
                       workers=workers if workers is not None else (os.cpu_count() or 1), device="cpu",
                       overwrite=True))
    return split_dir


# ---------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    """Total RAM in GiB from /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine_line() -> str:
    """One markdown line describing the machine and software."""
    import numpy
    import PIL
    import torch

    return (f"nproc {os.cpu_count()}, CPU `{cpu_model()}`, RAM {ram_gib():.1f} GiB, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} intra-op "
            f"threads), numpy {numpy.__version__}, Pillow {PIL.__version__}")


def command_line() -> str:
    """The command that ran this script, relative to the repo root."""
    script = os.path.relpath(sys.argv[0], ROOT)
    return " ".join(["python", script] + [shlex.quote(a) for a in sys.argv[1:]])


def now() -> str:
    """UTC timestamp for the report."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def log(msg: str) -> None:
    """Progress to stderr (stdout carries the markdown report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- timing


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls of fn (seconds): the least disturbed run on a noisy box."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def per_item_ms(fn: Callable[[object], object], items: Sequence, repeats: int = 3) -> float:
    """Best-of-repeats mean milliseconds of fn(item) over items."""
    if not items:
        return float("nan")
    return 1000.0 * best_of(lambda: [fn(x) for x in items], repeats) / len(items)


# -------------------------------------------------------------------------------- markdown


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def fmt(x: float, digits: int = 2) -> str:
    """Number with a fixed count of decimals (nan -> n/a)."""
    return "n/a" if x != x else f"{x:.{digits}f}"


def goal(ok: bool) -> str:
    """Met / missed marker for the tables."""
    return "**met**" if ok else "**missed**"


_MD_HEAD = """# Benchmarks

Produced by `scripts/bench_build.py` and `scripts/bench_loader.py` (`make bench` runs both). Each script
rewrites its own section below. The benchmark machine is shared and noisy: compare the **ratios**
(measured in the same run), not absolute times across runs. Input: the 50 real COCO images of
`../shared/data/tiny_coco`, repeated into a Hub-layout folder under the git-ignored `bench_data/`
(repeat k of image i has image id i + k * 1,000,000).
"""


def update_section(name: str, body: str, path: Path = BENCH_MD) -> None:
    """Replace (or append) the section delimited by <!-- bench:NAME --> ... <!-- /bench:NAME -->."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else _MD_HEAD
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block.rstrip("\n") + post
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def report_header(title: str) -> str:
    """Section heading with machine, command and date."""
    return (f"## {title}\n\n- Machine: {machine_line()}\n- Command: `{command_line()}`\n- Date: {now()}\n")


# ------------------------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _rollup_kib(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of one process in KiB from /proc/PID/smaps_rollup; zeros once it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


@dataclass
class TreeMemory:
    """Peaks of the summed Rss and Pss of a process tree, and the most processes seen at once."""

    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    max_procs: int = 0
    samples: int = 0


class TreeSampler:
    """Background thread sampling a process tree's summed Rss/Pss every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.mem = TreeMemory()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = process_tree(self.pid)
            parts = [_rollup_kib(p) for p in pids]
            m = self.mem
            m.peak_rss_kib = max(m.peak_rss_kib, sum(r for r, _ in parts))
            m.peak_pss_kib = max(m.peak_pss_kib, sum(p for _, p in parts))
            m.max_procs = max(m.max_procs, len(pids))
            m.samples += 1
            self._stop.wait(self.interval)


def publish(section: str, text: str, out_md: str, no_md: bool) -> None:
    """Print a report and, unless ``no_md``, replace its section of the benchmarks page."""
    print(text)
    if not no_md:
        update_section(section, text, Path(out_md))
        log(f"updated {out_md}")
