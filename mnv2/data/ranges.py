"""Byte ranges of files near or far: a local file, an http(s) URL, any fsspec URL; a bounded local cache.

    store = Store(Cache.default())
    data = Member("http://host/imagenet1k-train-0000.tar", 1536, 110_000, "n01440764_10026.jpg", store).read()

A sample in a shard or an official archive is one `Member`: where its bytes start and how many there are,
so reading it is one ranged read and the samplers index a list of members exactly as a list of paths.
Files and connections are opened lazily in each process (DataLoader workers fork), never shared.
A short or failed read is a `SourceError` naming the file and the offset.
"""
import hashlib
import http.client
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from mnv2.data.imagenet import DataError

CACHE_ENV = "MNV2_DATA_CACHE"            # the cache folder (default: ~/.cache/mnv2/data)
CACHE_SIZE_ENV = "MNV2_DATA_CACHE_GB"    # its bound in GB (default 50)
DEFAULT_CACHE_GB = 50.0


class SourceError(DataError):
    """A file that is missing, truncated or unreadable where a sample should be: never a bad image to skip."""


def is_url(location):
    return "://" in str(location)


@dataclass(frozen=True, order=True, slots=True)
class Member:
    """One file inside a tar: `size` bytes at `offset` of `location`. Prints as location/name."""
    location: str
    offset: int
    size: int
    name: str
    store: "Store" = field(compare=False, repr=False, default=None)

    def read(self):
        return self.store.read(self.location, self.offset, self.size, self.name)

    def __str__(self):
        return f"{self.location}/{self.name}"


def read_bytes(ref):
    """The bytes of a sample: a Member's range, or a whole local file."""
    if isinstance(ref, Member):
        return ref.read()
    with open(ref, "rb") as f:
        return f.read()


class Cache:
    """A folder of ranges read over the network, at most `limit` bytes: the least recently used leave first.

    Entries are written to a temporary name and renamed, so processes sharing the folder never read half
    an entry; one removed by another process is simply read again.
    """

    def __init__(self, folder, limit_bytes):
        self.folder, self.limit = Path(folder).expanduser(), int(limit_bytes)
        self._used, self._written = None, 0

    @classmethod
    def default(cls):
        folder = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mnv2" / "data"
        return cls(folder, float(os.environ.get(CACHE_SIZE_ENV) or DEFAULT_CACHE_GB) * 1e9)

    def _path(self, key):
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.folder / digest[:2] / digest

    def get(self, key):
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used
            return data
        except OSError:
            return None

    def put(self, key, data):
        if self.limit <= 0 or len(data) > self.limit:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        # Several loader processes fill one folder: each counts the folder again after writing a twentieth of
        # the bound, so together they overshoot it by at most (processes / 20) of it before a trim.
        self._written += len(data)
        if self._used is None or self._written > self.limit / 20:
            self._used, self._written = self.used(), 0
        if self._used + self._written > self.limit:
            self.trim(int(self.limit * 0.9))

    def entries(self):
        found = []
        for path in self.folder.glob("??/*"):
            if ".tmp-" in path.name:
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((stat.st_mtime_ns, stat.st_size, path))
        return found

    def used(self):
        return sum(size for _, size, _ in self.entries())

    def trim(self, target):
        """Remove the least recently used entries until at most `target` bytes remain."""
        entries = sorted(self.entries())
        used = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if used <= target:
                break
            try:
                path.unlink()
            except OSError:
                pass
            used -= size
        self._used, self._written = used, 0


class Store:
    """Reads byte ranges (local pread, HTTP Range requests, fsspec), through `cache` for remote ones.

    Open files and connections belong to the process that opened them: after a fork they are reopened.
    """

    def __init__(self, cache=None, timeout=60):
        self.cache, self.timeout = cache, timeout
        self._pid, self._open = None, {}

    def __getstate__(self):
        return {"cache": self.cache, "timeout": self.timeout}

    def __setstate__(self, state):
        self.__init__(state["cache"], state["timeout"])

    def _handles(self):
        if self._pid != os.getpid():
            self._pid, self._open = os.getpid(), {}
        return self._open

    def read(self, location, offset, size, name=None):
        what = f" ({name})" if name else ""
        if not is_url(location):
            return self._read_local(location, offset, size, what)
        key = f"{location}\0{offset}\0{size}"
        data = self.cache.get(key) if self.cache else None
        if data is None or len(data) != size:
            data = (self._read_http if location.startswith(("http://", "https://")) else self._read_fsspec)(
                location, offset, size, what)
            if self.cache:
                self.cache.put(key, data)
        return data

    def read_all(self, location):
        """A whole (small) file: an info or index file."""
        if not is_url(location):
            try:
                return Path(location).read_bytes()
            except OSError as e:
                raise SourceError(f"{location}: cannot read it ({e.strerror or e})") from None
        if location.startswith(("http://", "https://")):  # never cached: it says what the shards are now
            return self._read_http(location, None, None, "")
        return self._read_fsspec(location, None, None, "")

    def size(self, location):
        """The file's size in bytes, or a SourceError saying that it is missing."""
        if not is_url(location):
            try:
                return os.stat(location).st_size
            except OSError:
                raise SourceError(f"{location}: missing; restore it (the index lists it)") from None
        if location.startswith(("http://", "https://")):
            response = self._request(location, "HEAD", None, None, "")
            response.read()
            return int(response.getheader("Content-Length", -1))
        return int(self._fsspec(location)[0].size(location))

    # ---- local files ---------------------------------------------------------------------------------
    def _read_local(self, location, offset, size, what):
        handles = self._handles()
        fd = handles.get(location)
        if fd is None:
            try:
                fd = handles[location] = os.open(location, os.O_RDONLY)
            except OSError as e:
                raise SourceError(f"{location}: {'missing' if e.errno == 2 else e.strerror}{what}; restore the "
                                  "file (the index lists it)") from None
        data = os.pread(fd, size, offset)
        if len(data) != size:
            end = os.fstat(fd).st_size
            raise SourceError(f"{location}: truncated at byte {end}: bytes {offset}..{offset + size}{what} are "
                              "not there; copy the file again")
        return data

    # ---- HTTP(S): ranged GETs on one kept-alive connection per host and process ----------------------------
    def _connection(self, parts, fresh=False):
        handles = self._handles()
        key = ("http", parts.scheme, parts.netloc)
        if fresh or key not in handles:
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            handles[key] = kind(parts.netloc, timeout=self.timeout)
        return handles[key]

    def _request(self, location, method, offset, size, what):
        parts = urllib.parse.urlsplit(location)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {} if offset is None or size is None else {"Range": f"bytes={offset}-{offset + size - 1}"}
        for attempt in (0, 1):  # a kept-alive connection the server closed is opened once more
            connection = self._connection(parts, fresh=attempt > 0)
            try:
                connection.request(method, path, headers=headers)
                response = connection.getresponse()
                break
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                if attempt:
                    raise SourceError(f"{location}: cannot read bytes from {offset or 0}{what}: "
                                      f"{type(e).__name__}: {e}") from None
        if response.status == 404:
            response.read()
            raise SourceError(f"{location}: missing (HTTP 404){what}; the index lists it")
        if response.status == 416:
            response.read()
            raise SourceError(f"{location}: truncated before byte {offset + size}{what} (HTTP 416); "
                              "upload the file again")
        if response.status >= 400:
            response.read()
            raise SourceError(f"{location}: HTTP {response.status} {response.reason} at byte {offset or 0}{what}")
        if headers and response.status != 206:
            response.read()
            raise SourceError(f"{location}: the server ignores byte ranges (HTTP {response.status}, not 206); "
                              "serve the shards from one that supports Range requests")
        return response

    def _read_http(self, location, offset, size, what):
        response = self._request(location, "GET", offset, size, what)
        data = response.read()
        if size is not None and len(data) != size:
            raise SourceError(f"{location}: truncated: {len(data)} of the {size} bytes at byte {offset}{what}; "
                              "upload the file again")
        return data

    # ---- fsspec (s3://, gs://, ... where fsspec and its backend are installed) ----------------------------
    def _fsspec(self, location):
        handles = self._handles()
        if ("fsspec", location) not in handles:
            try:
                import fsspec
            except ImportError:
                raise SourceError(f"{location}: reading this URL needs fsspec (pip install fsspec and its "
                                  "backend, e.g. s3fs)") from None
            fs, path = fsspec.core.url_to_fs(location)
            handles[("fsspec", location)] = (fs, path)
        return handles[("fsspec", location)]

    def _read_fsspec(self, location, offset, size, what):
        fs, path = self._fsspec(location)
        try:
            if size is None:
                return fs.cat_file(path)
            data = fs.cat_file(path, start=offset, end=offset + size)
        except FileNotFoundError:
            raise SourceError(f"{location}: missing{what}; the index lists it") from None
        except OSError as e:
            raise SourceError(f"{location}: cannot read bytes {offset}..{offset + size}{what}: {e}") from None
        if len(data) != size:
            raise SourceError(f"{location}: truncated: {len(data)} of the {size} bytes at byte {offset}{what}")
        return data
