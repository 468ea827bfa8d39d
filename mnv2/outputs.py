"""Files a run writes, written so that a failure never replaces a good file: atomic writes, the training
reports (metrics.csv, the seed's result.txt, curves.png), and the output directory a run owns and locks.

    outputs.atomic_write(path, data)            # the old file or the complete new one, never a mix
    outputs.write_reports(metrics, save_path)

Every file goes to a unique temporary name beside its target, is flushed and synced, then renamed over
the target; the directory is synced so the rename survives a crash.
"""
import contextlib
import csv
import io
import json
import os
import re
import socket
import tempfile
import warnings
from pathlib import Path

from mnv2.cli import ScriptError, UsageError

try:  # POSIX: advisory locks that the kernel drops when the holder dies
    import fcntl
except ImportError:  # elsewhere the output directory is not locked
    fcntl = None

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                 "val_mean_class_top1", "ema_val_top1", "ema_val_top5", "images_per_s", "seconds", "skipped_steps", "failed_images"]


class OutputError(ScriptError, OSError):
    """A file could not be written; nothing was replaced. One line naming the file (exit code 1)."""


def atomic_write(path, data):
    """Write bytes or text to `path` atomically. Raises OutputError naming the file; the old file stays."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        raise OutputError(f"could not write {path}: {e.strerror or e}; nothing was replaced") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def fsync_dir(directory):
    # The rename lives in the directory; without this a crash can forget it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged(path):
    """A temporary path beside `path` for a writer that needs a file name (an exporter): renamed over `path`
    when the block succeeds, removed when it raises, so a failed or rejected export never replaces a file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"could not write {path}: {e.strerror or e}; nothing was replaced") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path, header, rows):
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def write_reports(metrics, directory):
    directory = Path(directory)
    write_csv(directory / "metrics.csv", METRIC_FIELDS,
              [[_fmt(row.get(k)) for k in METRIC_FIELDS] for row in metrics])
    # The seed's result.txt: one readable line per epoch.
    lines = [f"epoch {m['epoch']} lr {m['lr']:.6f} train loss {m['train_loss']:.4f} top1 {m['train_top1']:.2f} "
             f"| val loss {m['val_loss']:.4f} top1 {m['val_top1']:.2f}"
             + (f" top5 {m['val_top5']:.2f}" if m.get("val_top5") is not None else "")
             + (f" | ema top1 {m['ema_val_top1']:.2f}" if m.get("ema_val_top1") is not None else "")
             + f" | {m['images_per_s']:.0f} img/s {m['seconds']:.0f} s" for m in metrics]
    atomic_write(directory / "result.txt", "\n".join(lines) + "\n")
    plot_curves(metrics, directory / "curves.png")


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def plot_curves(metrics, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    axes[0].plot(epochs, [m["val_loss"] for m in metrics], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [m["train_top1"] for m in metrics], "o-", label="train top-1")
    axes[1].plot(epochs, [m["val_top1"] for m in metrics], "o-", label="val top-1")
    if any(m.get("val_top5") is not None for m in metrics):  # none with 5 classes or fewer: always 100%
        axes[1].plot(epochs, [m["val_top5"] for m in metrics], "o-", label="val top-5")
    if any(m.get("ema_val_top1") is not None for m in metrics):
        axes[1].plot(epochs, [m.get("ema_val_top1") for m in metrics], "o-", label="EMA val top-1")
    axes[1].set_title("accuracy (%)")
    axes[2].plot(epochs, [m["lr"] for m in metrics], "o-")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, image.getvalue())


# --------------------------------------------------------------------------------------------------
# A run owns its output directory


RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# What a training run leaves in its directory; checkpoints are last.pth, best.pth and epoch_N.pth.
CHECKPOINT_NAME = re.compile(r"^(last|best|epoch_(\d+))\.pth$")
REPORT_NAMES = ("args.yaml", "metrics.csv", "result.txt", "curves.png", "confusion.png", "model.int8.onnx",
                "model.safetensors", RUN_FILE, "tensorboard")


class RunDirectory:
    """The output directory of one training run, locked while the run lives.

    The lock is an advisory `flock` on DIR/.lock, which the kernel drops when the process ends however it
    ends, so a lock left by a dead process is never in the way. The lock file names the holder (pid and
    host) so a second run can say who is writing. DIR/run.json records which run the files belong to.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def lock(self):
        """Create the directory and take its lock, or fail in one line naming the run that holds it.
        Also the early proof that the directory is writable, before any work is done."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_FILE, "a+")
        except OSError as e:
            raise OutputError(f"--save-path {self.path}: cannot write there ({e.strerror or e}); choose a "
                              "writable folder") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise OutputError(f"--save-path {self.path} is in use by another run ({holder}); wait for it "
                                  "to end or choose another --save-path") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle
        return self

    def release(self):
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def owner(self):
        """The run id recorded in run.json, or None (no file, or one that does not parse)."""
        try:
            return json.loads((self.path / RUN_FILE).read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            return None

    def run_files(self):
        """The files a run left here (checkpoints and reports), sorted by name."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if CHECKPOINT_NAME.match(p.name) or p.name in REPORT_NAMES)

    def checkpoints(self):
        return [p for p in self.run_files() if CHECKPOINT_NAME.match(p.name)]

    def claim(self, run_id, **info):
        atomic_write(self.path / RUN_FILE, json.dumps({"run_id": run_id, **info}, indent=2) + "\n")

    def move_aside(self):
        """Move every file of the earlier run into DIR/previous-<its id>[-k]/; returns that folder."""
        name = f"previous-{self.owner() or 'run'}"
        target, k = self.path / name, 1
        while target.exists():
            k += 1
            target = self.path / f"{name}-{k}"
        target.mkdir()
        for path in self.run_files():
            os.replace(path, target / path.name)
        fsync_dir(self.path)
        return target

    def remove_stale_temporaries(self):
        """Temporary files left by a killed writer. Only called under the lock: no live run writes here."""
        for tmp in self.path.glob(".*.tmp-*"):
            try:
                tmp.unlink()
            except OSError:
                pass


def check_writable(path, flag):
    """Before long work: can `path` (a file to write later) be written? Creates its folder; one line if not."""
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be written ({e.strerror or e}); choose another path") from None


# Up to this many classes the confusion matrix is drawn whole, each cell readable; beyond, the most
# confused pairs say more than a wall of near-empty cells.
CONFUSION_MATRIX_MAX_CLASSES = 30


def plot_confusion(matrix, names, path, top_pairs=20):
    """confusion.png: the confusion matrix (rows: true class, columns: predicted; each row as a share of
    its images) for up to CONFUSION_MATRIX_MAX_CLASSES classes with images, else the `top_pairs` most
    confused (true -> predicted) pairs. `matrix` counts (true, predicted) pairs; `names` label the classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    rows = np.flatnonzero(counts.sum(1))
    shown = np.union1d(rows, np.flatnonzero(counts.sum(0)))
    if len(shown) <= CONFUSION_MATRIX_MAX_CLASSES:
        sub = counts[np.ix_(shown, shown)]
        share = sub / np.maximum(sub.sum(1, keepdims=True), 1)
        size = 3 + 0.35 * len(shown)
        fig, ax = plt.subplots(figsize=(size + 1.5, size))
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        labels = [names[i] for i in shown]
        ax.set_xticks(range(len(shown)), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(len(shown)), labels, fontsize=8)
        for r in range(len(shown)):
            for c in range(len(shown)):
                if sub[r, c]:
                    ax.text(c, r, str(sub[r, c]), ha="center", va="center", fontsize=7,
                            color="white" if share[r, c] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        correct = int(np.trace(counts))
        ax.set_title(f"confusion: {correct} of {int(counts.sum())} right")
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    else:
        pairs = confused_pairs(counts, top_pairs)
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * max(len(pairs), 1)))
        if pairs:
            ax.barh(range(len(pairs)), [n for _, _, n in pairs], color="tab:red")
            ax.set_yticks(range(len(pairs)), [f"{names[t]} -> {names[p]}" for t, p, _ in pairs], fontsize=8)
            ax.invert_yaxis()
        ax.set_xlabel("images (true -> predicted)")
        ax.set_title(f"the {len(pairs)} most confused pairs of {len(rows)} classes")
    image = io.BytesIO()
    with warnings.catch_warnings():  # a name in a script the font lacks is drawn as boxes; the CSV keeps it
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        warnings.filterwarnings("ignore", message=".*[Tt]ight.?layout")  # long names: the plot is drawn anyway
        fig.tight_layout()
        fig.savefig(image, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, image.getvalue())


def confused_pairs(matrix, top=10):
    """[(true, predicted, count)] of the most frequent mistakes, largest first."""
    import numpy as np

    off = np.asarray(matrix, dtype=np.int64).copy()
    if off.size == 0:
        return []
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None, kind="stable")[::-1][:top]
    return [(int(i // off.shape[1]), int(i % off.shape[1]), int(off.flat[i])) for i in flat if off.flat[i] > 0]
