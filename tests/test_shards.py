"""Shards (timm's imagenet-1k-wds format) and the official archives as --data-dir: the same images and labels
as the folders they came from, the same training and scores, exact resume, DDP, HTTP, damage refused.

    python -m pytest tests/test_shards.py -q
"""
import contextlib
import csv
import functools
import http.server
import io
import json
import os
import shutil
import tarfile
import textwrap
import threading
from pathlib import Path

import pytest

import evaluate
import helpers
import read_ImageNetData
import train
from mnv2 import cli
from mnv2.data import archives, folders, loaders, shards, transforms
from mnv2.data.demo import make_folder_demo
from mnv2.data.loaders import TrainSampler
from mnv2.data.ranges import CACHE_ENV, CACHE_SIZE_ENV, Cache, SourceError, read_bytes

BATCH = 8


def write_shards(data_dir, out, *flags):
    code, err, _ = helpers.run_script(read_ImageNetData, "--data-dir", data_dir, "--write-shards", out,
                                      "--shard-size", "0.004", "-j", "1", *flags)
    assert code == 0, err
    return out


def pairs(samples):
    return [(read_bytes(ref), label) for ref, label in samples]


@pytest.fixture(scope="module")
def demo_shards(demo_data, tmp_path_factory):
    return write_shards(demo_data, tmp_path_factory.mktemp("shards") / "wds")


@pytest.fixture
def no_cache_outside(tmp_path, monkeypatch):
    """Remote reads cache into tmp_path, never into the user's ~/.cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------------------------------
# Writing: every layout, the same (image, label) pairs, class order kept, resumable


@pytest.mark.parametrize("layout", ["seed", "torchvision-val-folders", "class-folders"])
def test_shards_list_the_same_images_and_labels_as_the_folders_they_were_written_from(layout, tmp_path):
    if layout == "class-folders":
        source = make_folder_demo(tmp_path / "digits", per_class=3)
        flags = ("--val-split", "0.34", "-j", "2")  # two shards at a time
    else:
        source = helpers.make_fake_imagenet(tmp_path / "inet", layout=layout.split("-")[0],
                                            val_folders=layout.endswith("folders"))["root"]
        flags = ()
    out = write_shards(source, tmp_path / "wds", *flags)
    expected = folders.build_datasets(source, val_split=0.34 if layout == "class-folders" else None)
    packed = shards.open_data(out)
    assert len(list(out.glob("*-train-*.tar"))) > 1  # several shards: the order across them counts too
    assert pairs(packed.splits["train"]) == pairs(expected.train.samples)
    assert pairs(packed.splits["val"]) == pairs(expected.val.samples)
    assert (packed.classes.order, packed.classes.wnids, packed.classes.names) == \
        (expected.classes.order, expected.classes.wnids, expected.classes.names)
    info = json.loads((out / "_info.json").read_text())
    for split in ("train", "validation"):  # timm's reader needs these fields
        entry = info["splits"][split]
        assert entry["name"] == split and entry["num_samples"] == sum(entry["shard_lengths"])
        assert all((out / f).is_file() for f in entry["filenames"])
    prefix = info["splits"]["train"]["filenames"][0].rsplit("-", 2)[0]
    wids = json.loads((out / f"{prefix}-train.wids.json").read_text())
    assert [(s["url"], s["nsamples"]) for s in wids["shardlist"]] == \
        list(zip(info["splits"]["train"]["filenames"], info["splits"]["train"]["shard_lengths"]))
    sums = dict(line.split()[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == set(info["splits"]["train"]["filenames"] + info["splits"]["validation"]["filenames"])


def test_a_shard_is_a_plain_webdataset_tar_of_jpg_cls_and_json(demo_data, demo_shards):
    first = json.loads((demo_shards / "_info.json").read_text())["splits"]["validation"]["filenames"][0]
    with tarfile.open(demo_shards / first) as tar:
        names = tar.getnames()
        assert names[:3] == ["ILSVRC2012_val_00000001.jpg", "ILSVRC2012_val_00000001.cls",
                             "ILSVRC2012_val_00000001.json"]
        label = int(tar.extractfile(names[1]).read())
        meta = json.loads(tar.extractfile(names[2]).read())
    expected = folders.build_datasets(demo_data).val.samples[0]
    assert label == expected[1] and meta["filename"].endswith("ILSVRC2012_val_00000001.JPEG")


def test_a_timm_set_without_this_repos_index_is_indexed_from_its_tar_headers(demo_shards, tmp_path):
    copy = tmp_path / "timm"
    copy.mkdir()
    for f in demo_shards.glob("*.tar"):
        (copy / f.name).write_bytes(f.read_bytes())
    info = json.loads((demo_shards / "_info.json").read_text())
    del info["classes"]  # timm's _info.json has no class list: ImageNet's sorted order is taken
    (copy / "_info.json").write_text(json.dumps(info))
    notes = []
    packed = shards.open_data(copy, note=notes.append)
    assert (copy / shards.INDEX).is_file() and any("sorted-WNID" in n for n in notes)
    assert pairs(packed.splits["val"]) == pairs(shards.open_data(demo_shards).splits["val"])


def test_an_interrupted_write_finishes_where_it_stopped_with_the_same_shards(demo_data, tmp_path, monkeypatch):
    straight = write_shards(demo_data, tmp_path / "straight")
    written = []
    real = shards.write_shard

    def fail_third(*args):
        if len(written) == 2:
            raise KeyboardInterrupt  # the writer is stopped
        written.append(args[1])
        return real(*args)

    monkeypatch.setattr(shards, "write_shard", fail_third)
    with pytest.raises(KeyboardInterrupt):
        helpers.run_script(read_ImageNetData, "--data-dir", demo_data, "--write-shards", tmp_path / "resumed",
                           "--shard-size", "0.004", "-j", "1")
    assert not (tmp_path / "resumed" / "_info.json").exists()
    monkeypatch.setattr(shards, "write_shard", real)
    again = []
    monkeypatch.setattr(shards, "write_shard", lambda *args: again.append(args[1]) or real(*args))
    write_shards(demo_data, tmp_path / "resumed")
    assert not set(again) & set(written)  # the finished shards were not written again
    assert (tmp_path / "resumed" / "SHA256SUMS").read_text() == (straight / "SHA256SUMS").read_text()


def test_an_image_that_does_not_decode_is_listed_not_written(tmp_path):
    data = helpers.make_fake_imagenet(tmp_path / "inet")
    bad = data["train"][1][0]
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    code, err, out = helpers.run_script(read_ImageNetData, "--data-dir", data["root"], "--write-shards",
                                        tmp_path / "wds", "-j", "1")
    assert code == 1 and f"rejected: {bad}" in out
    assert str(bad) in (tmp_path / "wds" / "_rejected.tsv").read_text()
    packed = shards.open_data(tmp_path / "wds")
    assert len(packed.splits["train"]) == len(data["train"]) - 1


def test_reading_shards_in_another_class_order_is_refused_in_one_line(demo_shards):
    code, err, _ = helpers.run_script(read_ImageNetData, "--data-dir", demo_shards, "--class-order", "devkit")
    assert code == 2 and "labelled in sorted order" in helpers.one_line(err)


# ----------------------------------------------------------------------------------------------------
# Training and evaluation: the same as from the folders


TRAIN_FLAGS = ("--batch-size", str(BATCH), "--num-epochs", "1", "--width-mult", "0.25", "--input-size", "32",
               "--num-workers", "0", "--print-freq", "100", "--device", "cpu")


def train_args(data, out, *extra):
    return train.get_args_parser().parse_args(["--data-dir", str(data), "--save-path", str(out), *TRAIN_FLAGS, *extra])


@pytest.fixture(scope="module")
def trained_on_folders(demo_data, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("folders_run")
    assert helpers.run_main(train, train_args(demo_data, out)) == 0
    return out / "last.pth"


@pytest.mark.slow
def test_one_epoch_from_shards_gives_the_weights_of_one_epoch_from_folders(demo_shards, trained_on_folders, tmp_path,
                                                                           one_thread):
    assert helpers.run_main(train, train_args(demo_shards, tmp_path)) == 0
    from_shards, from_folders = helpers.load_checkpoint(tmp_path / "last.pth"), \
        helpers.load_checkpoint(trained_on_folders)
    helpers.assert_same_tensors(from_shards["model"], from_folders["model"])
    helpers.assert_same_tensors(from_shards["optimizer"], from_folders["optimizer"])


@pytest.mark.slow
def test_the_gpu_data_backend_reads_shards_as_it_reads_folders(demo_data, demo_shards, tmp_path, one_thread):
    """--data-backend gpu (checked on the CPU): the loader hands over a shard member's bytes as a file's."""
    for name, data in (("folders", demo_data), ("shards", demo_shards)):
        assert helpers.run_main(train, train_args(data, tmp_path / name, "--data-backend", "gpu")) == 0
    helpers.assert_same_tensors(helpers.load_checkpoint(tmp_path / "shards" / "last.pth")["model"],
                                helpers.load_checkpoint(tmp_path / "folders" / "last.pth")["model"])


def preempted_and_resumed(data, out):
    """A run stopped by SIGTERM after its third step, then resumed: (its checkpoint, the indices it consumed)."""
    import signal
    consumed = []

    def preempt(epoch, step, indices):
        consumed.extend(indices.tolist())
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert helpers.run_main(train, train_args(data, out), on_step=preempt) == 128 + signal.SIGTERM
    assert 0 < helpers.load_checkpoint(out / "last.pth")["step"] < 5  # stopped mid-epoch
    assert helpers.run_main(train, train_args(data, out, "--resume", "auto"),
                            on_step=lambda epoch, step, indices: consumed.extend(indices.tolist())) == 0
    return helpers.load_checkpoint(out / "last.pth"), consumed


@pytest.mark.slow
def test_a_mid_epoch_resume_from_shards_is_bit_exact(demo_data, demo_shards, trained_on_folders, tmp_path,
                                                     one_thread):
    from_shards, seen = preempted_and_resumed(demo_shards, tmp_path / "shards")
    from_folders, seen_folders = preempted_and_resumed(demo_data, tmp_path / "folders")
    sampler = TrainSampler(40, seed=0)
    sampler.set_epoch(0)
    assert seen == seen_folders == list(sampler)  # every sample of the epoch once, in the sampler's order
    straight = helpers.load_checkpoint(trained_on_folders)  # the same epoch, never interrupted
    for key in ("model", "optimizer", "sampler", "step", "epoch"):
        helpers.assert_same_tensors(from_shards[key], from_folders[key])
        helpers.assert_same_tensors(from_shards[key], straight[key])


def predictions(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    file_column = rows[0].index("file")
    return [r[:file_column] + r[file_column + 1:] for r in rows]


def score(weights, data, out, *extra):
    code, err, _ = helpers.run_script(evaluate, "--weights", weights, "--data-dir", data, "--device", "cpu",
                                      "--batch-size", "4", "--num-workers", "0", "--no-progress",
                                      "--predictions", out, *extra)
    assert code == 0, err
    return predictions(out)


@pytest.mark.slow
def test_evaluation_on_shards_equals_evaluation_on_folders_image_by_image(demo_data, demo_shards, trained_on_folders,
                                                                          tmp_path, one_thread):
    on_folders = score(trained_on_folders, demo_data, tmp_path / "folders.csv")
    assert score(trained_on_folders, demo_shards, tmp_path / "shards.csv") == on_folders
    assert len(on_folders) == 1 + 10


DDP_EPOCH = textwrap.dedent("""
    import json, sys
    from mnv2 import distributed
    from mnv2.data import shards
    from mnv2.data.loaders import TrainSampler, build_loader
    context = distributed.setup("cpu")
    data = shards.build_datasets(sys.argv[1], input_size=32, resize=32)
    sampler = TrainSampler(len(data.train), num_replicas=context.world_size, rank=context.rank, seed=0)
    sampler.set_epoch(1)
    seen = []
    for images, targets, indices, failed in build_loader(data.train, 4, sampler, num_workers=1):
        seen += [[str(data.train.samples[i][0]), int(t)] for i, t in zip(indices.tolist(), targets.tolist())]
    with open(f"{sys.argv[2]}.{context.rank}", "w") as f:
        json.dump(seen, f)
    distributed.cleanup()
""")


@pytest.mark.slow
def test_a_two_process_ddp_epoch_from_shards_sees_every_sample_exactly_once(demo_shards, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_EPOCH)
    proc = helpers.torchrun(script, demo_shards, tmp_path / "seen")
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = [tuple(s) for rank in (0, 1) for s in json.loads((tmp_path / f"seen.{rank}").read_text())]
    expected = [(str(m), label) for m, label in shards.open_data(demo_shards).splits["train"]]
    assert len(seen) == len(expected) == 40 and sorted(seen) == sorted(expected)


@pytest.mark.slow
def test_quantize_on_shards_writes_the_int8_file_it_writes_on_folders(demo_data, demo_shards, trained_on_folders,
                                                                      tmp_path, one_thread):
    pytest.importorskip("onnxruntime")
    import quantize
    results = {}
    for name, data in (("folders", demo_data), ("shards", demo_shards)):
        code, err, _ = helpers.run_script(quantize, "--weights", trained_on_folders, "--data-dir", data, "--out",
                                          tmp_path / f"{name}.onnx", "--calibration-images", "8", "--num-workers",
                                          "0", "--no-progress", "--json", tmp_path / f"{name}.json")
        assert code == 0, err
        accuracy = json.loads((tmp_path / f"{name}.json").read_text())["accuracy"]
        results[name] = {k: {m: v for m, v in r.items() if m not in ("seconds", "images_per_s")}
                         if isinstance(r, dict) else r for k, r in accuracy.items()}
    assert (tmp_path / "shards.onnx").read_bytes() == (tmp_path / "folders.onnx").read_bytes()  # same calibration
    assert results["shards"] == results["folders"]


# ----------------------------------------------------------------------------------------------------
# Over HTTP and fsspec URLs


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files of a folder with Range requests answered (206), as object stores and CDNs answer them."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        wanted = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not wanted or not path.is_file():
            return super().do_GET()
        start, end = (int(v) for v in wanted.removeprefix("bytes=").split("-"))
        data = path.read_bytes()
        if start >= len(data):
            self.send_response(416)
            self.end_headers()
            return
        body = data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serve(folder):
    """An HTTP server on 127.0.0.1 for `folder`, in a thread, shut down on the way out: its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def served(demo_shards):
    with serve(demo_shards) as url:
        yield url


def test_shards_read_over_http_give_the_local_images_and_labels_through_a_bounded_cache(
        demo_shards, served, no_cache_outside, monkeypatch):
    monkeypatch.setenv(CACHE_SIZE_ENV, "0.000008")  # 8 kB: less than the data, so old entries must leave
    remote = shards.open_data(served + "_info.json")
    local = shards.open_data(demo_shards)
    assert pairs(remote.splits["val"]) == pairs(local.splits["val"])
    assert pairs(remote.splits["train"]) == pairs(local.splits["train"])
    assert 0 < Cache.default().used() <= 8000


def test_a_shard_gone_or_cut_on_the_server_is_one_line_naming_it_and_the_byte(demo_shards, tmp_path,
                                                                              no_cache_outside):
    copy = tmp_path / "wds"
    shutil.copytree(demo_shards, copy)
    with serve(copy) as url:
        remote = shards.open_data(url)
        gone = sorted(copy.glob("*-validation-*.tar"))[-1]
        gone.unlink()
        val = loaders.ImageNetDataset(remote.splits["val"], transforms.eval_transform(32, 32), train=False)
        with pytest.raises(SourceError) as raised:
            for _ in loaders.build_loader(val, 4, loaders.EvalSampler(len(val)), num_workers=1):
                pass
    line = cli.own_message(raised.value)
    assert "\n" not in line and line.startswith(f"{url}{gone.name}: missing (HTTP 404)")
    cut = sorted(copy.glob("*-train-*.tar"))[0]
    member = next(m for m, _ in remote.splits["train"] if m.location.endswith(cut.name))
    with open(cut, "r+b") as f:
        f.truncate(member.offset + member.size // 2)
    with serve(copy) as url, pytest.raises(SourceError, match=f"truncated: {member.size // 2} of the {member.size} "
                                                             f"bytes at byte {member.offset}"):
        shards.open_data(url).splits["train"][0][0].read()


def test_the_cache_keeps_the_recently_used_ranges_within_its_bound(tmp_path):
    cache = Cache(tmp_path / "cache", 3000)
    for k in range(3):
        cache.put(f"range {k}", bytes([k]) * 1000)
        os.utime(cache._path(f"range {k}"), ns=(10**9 * (k + 1),) * 2)  # written in this order, long ago
    assert cache.get("range 0") == bytes(1000)  # used again: now the most recent
    cache.put("range 3", bytes([3]) * 1000)  # over the bound: the least recently used leave
    assert [cache.get(f"range {k}") is not None for k in range(4)] == [True, False, False, True]
    assert cache.used() <= 3000


@pytest.mark.slow
def test_evaluation_over_http_equals_evaluation_on_folders(demo_data, served, trained_on_folders, no_cache_outside,
                                                           tmp_path, one_thread):
    assert score(trained_on_folders, served, tmp_path / "http.csv") == \
        score(trained_on_folders, demo_data, tmp_path / "folders.csv")


def test_shards_read_from_an_fsspec_url_give_the_local_images_and_labels(demo_shards, no_cache_outside):
    fsspec = pytest.importorskip("fsspec")
    memory, root = fsspec.filesystem("memory"), f"/wds-{os.getpid()}"
    try:
        for f in demo_shards.iterdir():
            memory.pipe(f"{root}/{f.name}", f.read_bytes())
        remote = shards.open_data(f"memory://{root}/")
        assert pairs(remote.splits["val"]) == pairs(shards.open_data(demo_shards).splits["val"])
    finally:
        memory.rm(root, recursive=True)


# ----------------------------------------------------------------------------------------------------
# The official archives, read as they are


def make_official_archives(data, out):
    """ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar (flat) and the devkit
    .tar.gz, built from a fake ImageNet as the real ones are laid out."""
    out.mkdir()
    with tarfile.open(out / archives.TRAIN_TAR, "w") as outer:
        for wnid in data["image_wnids"]:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for path in sorted((data["train_dir"] / wnid).iterdir()):
                    t.add(path, arcname=path.name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(inner.getvalue())
            outer.addfile(info, io.BytesIO(inner.getvalue()))
    with tarfile.open(out / archives.VAL_TAR, "w") as t:
        for path in sorted(data["val_dir"].iterdir()):
            t.add(path, arcname=path.name)
    with tarfile.open(out / archives.DEVKIT_TAR, "w:gz") as t:
        t.add(data["meta_mat"], arcname="ILSVRC2012_devkit_t12/data/meta.mat")
        t.add(data["ground_truth"], arcname="ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
    return out


@pytest.mark.parametrize("order", ["sorted", "devkit"])
def test_the_official_archives_read_as_they_are_give_the_extracted_images_and_labels(order, tmp_path):
    data = helpers.make_fake_imagenet(tmp_path / "inet", train_per_class=3)
    root = make_official_archives(data, tmp_path / "archives")
    notes = []
    packed = shards.open_data(root, order, note=notes.append)
    expected = folders.build_datasets(data["root"], order)
    assert pairs(packed.splits["train"]) == pairs(expected.train.samples)
    assert pairs(packed.splits["val"]) == pairs(expected.val.samples)
    assert packed.classes.wnids == expected.classes.wnids
    assert (root / (archives.TRAIN_TAR + archives.INDEX_SUFFIX)).is_file() and len(notes) == 2
    shards.open_data(root, order, note=notes.append)
    assert len(notes) == 2  # the cached index is used
    os.utime(root / archives.VAL_TAR, ns=(0, 0))  # the archive changed: its index is refused, made again
    again = shards.open_data(root, order, note=notes.append)
    assert len(notes) == 3 and "made of another" in notes[-1]
    assert pairs(again.splits["val"]) == pairs(expected.val.samples)
    (root / "ILSVRC2012_img_val").mkdir()  # extracted beside the archives: the extracted copy is read
    assert shards.open_data(root, order) is None


@pytest.mark.slow
def test_train_py_trains_on_the_official_archives(demo_data, trained_on_folders, tmp_path, one_thread):
    fake = {"image_wnids": sorted(p.name for p in (demo_data / "ILSVRC2012_img_train").iterdir()),
            "train_dir": demo_data / "ILSVRC2012_img_train", "val_dir": demo_data / "ILSVRC2012_img_val",
            "meta_mat": demo_data / "ILSVRC2012_devkit_t12" / "data" / "meta.mat",
            "ground_truth": demo_data / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"}
    root = make_official_archives(fake, tmp_path / "archives")
    assert helpers.run_main(train, train_args(root, tmp_path / "run")) == 0
    helpers.assert_same_tensors(helpers.load_checkpoint(tmp_path / "run" / "last.pth")["model"],
                                helpers.load_checkpoint(trained_on_folders)["model"])


# ----------------------------------------------------------------------------------------------------
# Damage: one line naming the file and the offset


def test_a_truncated_shard_is_refused_in_one_line_naming_it_and_the_offset(demo_shards, tmp_path):
    copy = tmp_path / "wds"
    shutil.copytree(demo_shards, copy)
    shard = sorted(copy.glob("*-validation-*.tar"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    code, err, _ = helpers.run_script(train, *TRAIN_FLAGS, "--data-dir", copy, "--save-path", tmp_path / "run")
    line = helpers.one_line(err)
    assert code == 1 and str(shard) in line and f"truncated at byte {size // 2}" in line
    shard.unlink()
    code, err, _ = helpers.run_script(read_ImageNetData, "--data-dir", copy)
    line = helpers.one_line(err)
    assert code == 1 and str(shard) in line and "missing" in line


def test_a_truncated_archive_is_refused_in_one_line_naming_it_and_the_offset(tmp_path):
    data = helpers.make_fake_imagenet(tmp_path / "inet")
    root = make_official_archives(data, tmp_path / "archives")
    val = root / archives.VAL_TAR
    with open(val, "r+b") as f:
        f.truncate(2048)
    code, err, _ = helpers.run_script(read_ImageNetData, "--data-dir", root)
    line = helpers.one_line(err)
    assert code == 1 and str(val) in line and "byte" in line
