"""The training input pipeline per core from tar shards against from folders of files, in one run, and the
shard-writing rate.

The same images (real ImageNet photos when --images names them) are laid out as class folders, written as a
shard set (read_ImageNetData.py --write-shards), and read by the training dataset (RandomResizedCrop + flip,
uint8 out) through the same sampler, one process, one thread, alternating repeats. A third side reads the
shards over HTTP from a server on 127.0.0.1 in another process (one ranged GET per image, the cache off):
what a remote set costs this process besides the network's own latency and bandwidth.

Usage: python bench/bench_shards.py --images ../shared/imagenet_samples [--repeats 5] [--json out.json]
"""
import argparse
import functools
import http.server as http_server
import json
import shutil
import statistics
import sys
import tempfile
import multiprocessing
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_data  # noqa: E402
from mnv2 import distributed  # noqa: E402
from mnv2.data import folders, loaders, shards  # noqa: E402


def make_folders(paths, root):
    """root/train/<class>/ holding the images: the class is the WNID of a file named <WNID>.JPEG, else one class."""
    for k, p in enumerate(paths):
        name = p.stem.split("_")[0]
        folder = root / "train" / (name if name.startswith("n") and name[1:].isdigit() else "images")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, folder / f"{k:05d}_{p.name}")
    return root


class _RangeHandler(http_server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept-alive connections, as object stores and CDNs keep them
    disable_nagle_algorithm = True  # the headers and the body leave at once, as from a real server

    def log_message(self, *args):
        pass

    def do_GET(self):
        wanted, path = self.headers.get("Range"), Path(self.translate_path(self.path))
        if not wanted or not path.is_file():
            return super().do_GET()
        start, end = (int(v) for v in wanted.removeprefix("bytes=").split("-"))
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end + 1 - start)
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(folder, port):
    """Serve `folder` with Range requests answered, until killed (in its own process: its work is not timed)."""
    handler = functools.partial(_RangeHandler, directory=folder)
    http_server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


def _wait_for(url, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return shards.open_shards(url)
        except shards.DataError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _loader(dataset, batch_size):
    sampler = loaders.TrainSampler(len(dataset), seed=0)
    return loaders.build_loader(dataset, batch_size, sampler, num_workers=0, pin_memory=False, drop_last=False)


def run(images=None, repeats=5, limit=0, batch_size=32, input_size=224, seed=0, http=True):
    """Rows {name: {"ratio", "ours", "reference", "unit"}}: shards/folders for the training pipeline (local,
    and over HTTP on 127.0.0.1 when `http`), and the writing rate against the folder pipeline's."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = bench_data._paths(images, limit) if images else bench_data.make_jpegs(tmp / "generated")
        root = make_folders(paths, tmp / "data")
        data = folders.build_datasets(root)
        start = time.perf_counter()
        shards.write_shards(tmp / "wds", data.classes, {"train": data.train.samples}, root=root, prefix="bench",
                            shard_mb=max(1, sum(p.stat().st_size for p in paths) / 4e6), workers=1, log=lambda *a: None)
        write_rate = len(paths) / (time.perf_counter() - start)
        sides = {"folders": data.train, "shards": shards.build_datasets(tmp / "wds", input_size=input_size).train}
        server = None
        if http:
            port = distributed.free_port()
            server = multiprocessing.get_context("spawn").Process(target=_serve, args=(str(tmp / "wds"), port),
                                                                  daemon=True)
            server.start()
            remote = _wait_for(f"http://127.0.0.1:{port}/")
            remote.splits["train"][0][0].store.cache = None  # one store for all members: every read goes to the server
            sides["http"] = loaders.ImageNetDataset(remote.splits["train"], data.train.transform, train=True)
        try:
            for ds in sides.values():
                ds.transform = data.train.transform
            speeds = {side: [] for side in sides}
            for side, ds in sides.items():  # warm up: page cache, allocator, connections
                next(iter(_loader(ds, batch_size)))
            for _ in range(repeats):  # alternate, so load from other processes hits every side alike
                for side, ds in sides.items():
                    speeds[side].append(bench_data._images_per_s(_loader(ds, batch_size)))
        finally:
            if server is not None:
                server.terminate()
                server.join()
    folder_rate = statistics.median(speeds["folders"])
    rows = {}
    for side, name in (("shards", "input pipeline train from shards vs folders (per core)"),
                       ("http", "input pipeline train from shards over HTTP 127.0.0.1 vs folders (per core)")):
        if side in speeds:
            rate = statistics.median(speeds[side])
            rows[name] = {"ratio": rate / folder_rate, "ours": rate, "reference": folder_rate, "unit": "images/s"}
    rows["shard writing vs the folder training pipeline (per core)"] = {
        "ratio": write_rate / folder_rate, "ours": write_rate, "reference": folder_rate, "unit": "images/s"}
    return rows


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of real JPEGs (default: generate 64 of ImageNet size)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats; the median is reported")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-http", action="store_true", help="leave out the HTTP side")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    return parser


def main(args):
    if args.images is not None and not args.images.is_dir():
        get_args_parser().error(f"argument --images: {args.images} is not a directory")
    rows = run(args.images, args.repeats, args.limit, args.batch_size, http=not args.no_http)
    print(f"{'measurement':78s} {'ratio':>7s} {'ours':>9s} {'reference':>10s}  unit")
    for name, row in rows.items():
        print(f"{name:78s} {row['ratio']:6.2f}x {row['ours']:9.1f} {row['reference']:10.1f}  {row['unit']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
