"""The same photos as a folder, as WebDataset tar shards and as Parquet: extract side by side.

    python benchmarks/shards.py                       # 20,000 generated photos, 20 shards
    python benchmarks/shards.py --images 1000 --scan-entries 1000000

(1) ``extract`` throughput on the same generated photo-sized JPEGs (500x375, as in
extract_throughput.py) stored three ways: a folder (train/ and val/ class folders), 20 tar
shards (16 train, 4 val, .jpg + .cls members, classes.txt) and two Parquet files (train,
val; the {bytes, path} image struct `datasets` writes, row groups of 100). Same backbone,
same settings, the files in the page cache for all three; rounds alternate the sources.
(2) Time to list a source of ``--scan-entries`` tiny samples (tar shards of .jpg + .cls;
a Parquet file) and, for the tar shards, the time from calling extract to its first batch
written (listing, fingerprint, in-progress file, this rank's first shard listed again).
(3) Resume after a kill: extract of the shards in a child process SIGKILLed after
``--kill-after`` batches, then the same command again: what it reused, what it read, and
whether the finished cache equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from common import save
from extract_throughput import generate

from embedcache import extract
from embedcache.config import ExtractConfig
from embedcache.sources import scan

ROOT = Path(__file__).resolve().parents[1]


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def to_shards(folder: Path, out: Path, shards: int) -> str:
    """The folder's images as tar shards: 4/5 of them train, the rest val; returns the pattern."""
    out.mkdir(parents=True)
    classes = sorted(p.name for p in (folder / "train").iterdir())
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    n_val = max(1, shards // 5)
    for split, n in (("train", shards - n_val), ("val", n_val)):
        files = sorted((folder / split).rglob("*.jpg"))
        for k in range(n):
            with tarfile.open(out / f"{split}-{k:02d}.tar", "w") as tf:
                for f in files[k::n]:
                    add(tf, f"{f.stem}.jpg", f.read_bytes())
                    add(tf, f"{f.stem}.cls", str(classes.index(f.parent.name)).encode())
    return str(out / f"{{train-{{00..{shards - n_val - 1:02d}}},val-{{00..{n_val - 1:02d}}}}}.tar")


def to_parquet(folder: Path, out: Path) -> Path:
    """The folder's images as one Parquet file per split, the way `datasets` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    classes = sorted(p.name for p in (folder / "train").iterdir())
    meta = {"info": {"features": {"label": {"names": classes, "_type": "ClassLabel"}}}}
    for split in ("train", "val"):
        files = sorted((folder / split).rglob("*.jpg"))
        table = pa.table(
            {
                "image": pa.array([{"bytes": f.read_bytes(), "path": f.name} for f in files]),
                "label": pa.array([classes.index(f.parent.name) for f in files], pa.int64()),
            }
        )
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
        pq.write_table(table, out / f"{split}-00000-of-00001.parquet", row_group_size=100)
    return out


def extract_rates(sources: dict[str, object], tmp: Path, args) -> tuple[dict, dict]:
    """Images/s of extract per source, and CPU milliseconds per image (every thread of this
    process: steadier than wall time on a machine others share); rounds alternate sources."""
    rates: dict[str, list[float]] = {name: [] for name in sources}
    cpu_ms: dict[str, list[float]] = {name: [] for name in sources}
    kw = {"backbone": args.backbone, "weights": args.weights, "progress": False}
    for r in range(args.rounds):
        for name, data in sources.items():
            out = tmp / f"{name}-{r}.h5"
            cpu = time.process_time()
            result = extract(data, out=out, **kw)
            cpu_ms[name].append((time.process_time() - cpu) * 1000 / result.images)
            rates[name].append(result.images_per_s)
            print(
                f"round {r} {name}: {result.summary()}; {cpu_ms[name][-1]:.0f} CPU ms/image",
                flush=True,
            )
            if r:
                out.unlink()
    return rates, cpu_ms


def tiny_shards(out: Path, entries: int, shards: int) -> str:
    """``entries`` samples of one 8x8 JPEG and a .cls each, in ``shards`` tar shards."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    out.mkdir(parents=True)
    per = entries // shards
    for k in range(shards):
        with open(out / f"tiny-{k:03d}.tar", "wb") as f:
            for i in range(k * per, (k + 1) * per):  # headers made once per member, as tarfile does
                for ext, data in (("jpg", jpg), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    f.write(info.tobuf() + data + b"\0" * (-len(data) % 512))
            f.write(b"\0" * 1024)
    return str(out / f"tiny-{{000..{shards - 1:03d}}}.tar")


def tiny_parquet(out: Path, entries: int) -> Path:
    """``entries`` rows of one 8x8 JPEG and a label, row groups of 10,000."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="JPEG")
    jpg = buf.getvalue()

    out.mkdir(parents=True)
    table = pa.table(
        {
            "image": pa.array([jpg] * entries, pa.binary()),
            "label": pa.array(np.arange(entries) % 10, pa.int64()),
        }
    )
    pq.write_table(table, out / "tiny.parquet", row_group_size=10_000)
    return out / "tiny.parquet"


def first_batch_s(data, out: Path) -> float:
    """Seconds from calling extract to its first batch written (a tiny random backbone: the
    listing and the bookkeeping are what is measured), then the run is stopped."""
    from embedcache.cache import PartialCache

    write, start, at = PartialCache.write, time.perf_counter(), []

    def first(self, *a):
        write(self, *a)
        at.append(time.perf_counter() - start)
        raise KeyboardInterrupt

    PartialCache.write = first
    try:
        extract(data, out=out, backbone="resnet18", weights="none", image_size=32, progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        PartialCache.write = write
    return at[0]


def scan_times(tmp: Path, entries: int, shards: int) -> dict:
    t = time.perf_counter()
    pattern = tiny_shards(tmp / "tiny", entries, shards)
    made = time.perf_counter() - t
    t = time.perf_counter()
    images = scan(pattern, ExtractConfig())
    listed = time.perf_counter() - t
    print(
        f"{len(images)} entries in {shards} shards ({made:.0f} s to write): "
        f"listed in {listed:.1f} s",
        flush=True,
    )
    warm = first_batch_s(tiny_shards(tmp / "warm", 20, 1), tmp / "warm.h5")  # imports, graph
    first = first_batch_s(pattern, tmp / "tiny.h5")
    print(f"first batch after {first:.1f} s ({warm:.1f} s for 20 entries)", flush=True)
    t = time.perf_counter()
    pq_images = scan(tiny_parquet(tmp / "tinypq", entries), ExtractConfig())
    pq_listed = time.perf_counter() - t
    print(f"{len(pq_images)} Parquet rows listed in {pq_listed:.1f} s", flush=True)
    tar_bytes = sum(p.stat().st_size for p in (tmp / "tiny").glob("*.tar"))
    return {
        "entries": len(images),
        "shards": shards,
        "tar_bytes": tar_bytes,
        "tar_list_s": listed,
        "tar_first_batch_s": first,
        "first_batch_20_entries_s": warm,
        "parquet_rows": len(pq_images),
        "parquet_list_s": pq_listed,
    }


KILLER = """
import os, signal, sys
from embedcache import cache
from embedcache.cli import main
after, write, done = int(os.environ["KILL_AFTER"]), cache.PartialCache.write, []
def then_die(self, *a):
    write(self, *a)
    done.append(1)
    if len(done) >= after:
        os.kill(os.getpid(), signal.SIGKILL)
cache.PartialCache.write = then_die
main(sys.argv[1:], prog_name="embedcache")
"""


def same_features(a: Path, b: Path) -> bool:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        splits = [s for s in fa if isinstance(fa[s], h5py.Group) and "features" in fa[s]]
        return all(
            np.array_equal(fa[s]["features"][:], fb[s]["features"][:])
            and list(fa[s]["paths"].asstr()[:]) == list(fb[s]["paths"].asstr()[:])
            for s in splits
        )


def resume_after_kill(pattern: str, ref: Path, tmp: Path, args) -> dict:
    """SIGKILL an extract of the shards after ``args.kill_after`` batches, then run it again."""
    out = tmp / "killed.h5"
    cmd = [
        sys.executable,
        "-c",
        KILLER,
        "extract",
        pattern,
        "--out",
        str(out),
        "-b",
        args.backbone,
        "-w",
        args.weights,
        "-q",
    ]
    env = {**os.environ, "KILL_AFTER": str(args.kill_after), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    killed_s = time.perf_counter() - t
    r = extract(pattern, out=out, backbone=args.backbone, weights=args.weights, progress=False)
    print(
        f"killed (rc {killed.returncode}) after {killed_s:.1f} s; resumed: {r.summary()}",
        flush=True,
    )
    return {
        "kill_after_batches": args.kill_after,
        "returncode": killed.returncode,
        "killed_after_s": killed_s,
        "reused": r.reused,
        "extracted": r.extracted,
        "resume_s": r.seconds,
        "identical_to_uninterrupted": same_features(out, ref),
    }


def table(n: int, rates: dict, cpu_ms: dict, scan_info: dict, resume: dict, args) -> str:
    lines = [
        f"{n} generated 500x375 JPEGs, {args.backbone} ({args.weights} weights), "
        "extract's defaults; "
        f"{args.rounds} rounds alternating the sources, median (best) of each.\n",
        "| source | images/s median | best | vs folder | CPU ms/image median | vs folder |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base, base_cpu = statistics.median(rates["folder"]), statistics.median(cpu_ms["folder"])
    for name, rs in rates.items():
        m, c = statistics.median(rs), statistics.median(cpu_ms[name])
        lines.append(
            f"| {name} | {m:.1f} | {max(rs):.1f} | {m / base:.2f}x | "
            f"{c:.0f} | {c / base_cpu:.2f}x |"
        )
    s = scan_info
    lines += [
        "",
        f"Listing {s['entries']:,} tiny samples: "
        f"{s['shards']} tar shards ({s['tar_bytes'] / 1e9:.2f} GB, "
        f".jpg + .cls each) in {s['tar_list_s']:.1f} s; extract's first batch written "
        f"{s['tar_first_batch_s']:.1f} s after the call (listing, fingerprint, in-progress file, "
        f"first shard listed again; {s['first_batch_20_entries_s']:.1f} s for a source of 20 "
        f"entries, after the same warm-up); a Parquet file of {s['parquet_rows']:,} rows listed in "
        f"{s['parquet_list_s']:.1f} s.",
        "",
        "Resume after a kill: extract of the shards SIGKILLed after "
        f"{resume['kill_after_batches']} batches "
        f"(rc {resume['returncode']}, {resume['killed_after_s']:.1f} s); the same command "
        f"again reused {resume['reused']} rows, "
        f"read {resume['extracted']} in {resume['resume_s']:.1f} s; "
        "finished cache bit-identical to the uninterrupted one: "
        f"{resume['identical_to_uninterrupted']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--scan-entries", type=int, default=1_000_000)
    p.add_argument("--kill-after", type=int, default=20, help="batches before the SIGKILL")
    p.add_argument("--name", default="shards_cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        folder = generate(tmp / "folder", args.images)
        sources = {
            "folder": folder,
            "tar shards": to_shards(folder, tmp / "tar", args.shards),
            "parquet": to_parquet(folder, tmp / "pq"),
        }
        rates, cpu_ms = extract_rates(sources, tmp, args)
        resume = resume_after_kill(sources["tar shards"], tmp / "tar shards-0.h5", tmp, args)
        scan_info = scan_times(tmp, args.scan_entries, args.shards)
    payload = {
        "images": args.images,
        "rates": rates,
        "cpu_ms_per_image": cpu_ms,
        "scan": scan_info,
        "resume": resume,
        "args": vars(args),
    }
    print(
        save(
            args.name, payload, table(args.images, rates, cpu_ms, scan_info, resume, args)
        ).read_text()
    )


if __name__ == "__main__":
    main()
