"""The node-local cache: one copy of a remote checkpoint per node, shared by the ranks on it.

    CACHE_DIR/<scheme>/<container>[/@revision][/prefix]/
        manifest.json       the last listing (names, sizes, versions, checksums)
        complete/NAME       files fetched whole and verified; complete.json maps them to versions
        partial/NAME        sparse files being fetched (or sliced for one rank), with NAME.ranges,
                            the journal of byte ranges written (first line: version and size)
        views/KEY/NAME      hard links a reader opens when some files are only partly fetched
        locks/NAME.lock     held while one process reads, fetches or publishes NAME
        .lock               held for a moment while manifest.json or complete.json is written

Each file has its own lock, so the ranks of a node fetch different files at once and the same bytes
once: a rank takes the files nobody holds first, and then waits for the others, which by then are
usually fetched and verified by the rank that held them.
A file reaches complete/ only through verify + rename, so nothing half-written ever looks complete.
The journal is appended after each range is written, so a killed fetch resumes where it stopped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from grokserve.model.sources.errors import SourceError, StoreUnreachable
from grokserve.model.sources.location import Location
from grokserve.model.sources.ranges import Ranges, merge, split, subtract, total
from grokserve.model.sources.store import Checksum, ObjectInfo, Store
from grokserve.model.sources.verify import verify

DEFAULT_CACHE_DIR = Path("~/.cache/grokserve")
CHUNK_BYTES = 16 << 20  # one range request; also the unit a killed fetch loses at most
PARALLEL_REQUESTS = 8


@dataclass(frozen=True)
class Fetched:
    """What `fetch` made available: `path` to open, and what it cost."""

    path: Path
    fetched_bytes: int  # read from the store by this call
    needed_bytes: int  # the caller's share (all of it unless sliced)
    total_bytes: int  # the whole checkpoint as stored
    seconds: float


# Given a file and a way to read its bytes [start, stop) (fetched through the cache), the ranges a
# caller needs of it. Without a slicer every file is fetched whole.
Slicer = Callable[[ObjectInfo, Callable[[int, int], bytes]], Ranges]

# Told (bytes of the caller's share on disk: found in the cache or fetched so far, bytes of the
# share known so far) as the bytes arrive, so that a waiting caller can show progress. A file
# another rank holds joins the share once its turn comes: the second figure may grow.
Progress = Callable[[int, int], None]


def journal_of(data: Path) -> Path:
    return data.with_name(data.name + ".ranges")


def journalled(journal: Path, info: ObjectInfo) -> Ranges:
    """The ranges of `info`'s version that a journal records as written (none for another
    version, or no journal)."""
    try:
        first, *lines = journal.read_text().splitlines()
        header = json.loads(first)
    except (OSError, ValueError):
        return []
    if header != {"version": info.version, "size": info.size}:
        return []  # another version of the object: start again
    ranges = []
    for line in lines:
        parts = line.split()
        # A line cut by a kill is skipped, or (its stop cut short) claims less than was written.
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            ranges.append((int(parts[0]), int(parts[1])))
    return merge(ranges)


class PartialFile:
    """A sparse local copy of one object and the journal of the ranges it holds; opened only while
    the object's file lock is held."""

    def __init__(self, data: Path, info: ObjectInfo) -> None:
        self.data = data
        self.info = info
        self.journal = journal_of(data)
        self.lock = threading.Lock()
        self.have: Ranges = journalled(self.journal, info)
        data.parent.mkdir(parents=True, exist_ok=True)
        if not self.have:
            # A new inode: views of an older version keep their hard links to the old one.
            data.unlink(missing_ok=True)
            self.journal.write_text(json.dumps({"version": info.version, "size": info.size}) + "\n")
        with open(data, "ab") as file:  # sparse: holes cost no disk until written
            file.truncate(info.size)
        self.fd = os.open(data, os.O_RDWR)

    def write(self, start: int, data: bytes) -> None:
        os.pwrite(self.fd, data, start)
        with self.lock:
            with open(self.journal, "a") as journal:
                journal.write(f"{start} {start + len(data)}\n")
            self.have = merge([*self.have, (start, start + len(data))])

    def read(self, start: int, stop: int) -> bytes:
        return os.pread(self.fd, stop - start, start)

    @property
    def complete(self) -> bool:
        return self.have == [(0, self.info.size)] or self.info.size == 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NodeCache:
    def __init__(
        self,
        root: Path,
        location: Location,
        chunk_bytes: int = CHUNK_BYTES,
        parallel: int = PARALLEL_REQUESTS,
    ) -> None:
        self.location = location
        self.directory = root.expanduser() / location.cache_key
        self.chunk_bytes = chunk_bytes
        self.parallel = parallel
        self.fetched_bytes = 0  # by this object, headers included
        self.count_lock = threading.Lock()
        self.abort = threading.Event()  # set when a request failed: the others stop

    # -- the public entry ---------------------------------------------------------------------------

    def fetch(
        self,
        store: Store,
        slicer: Slicer | None = None,
        progress: bool = False,
        on_progress: Progress | None = None,
    ) -> Fetched:
        """Makes the checkpoint (or the caller's slice of it) local; see the module docstring."""
        started, fetched_before = time.perf_counter(), self.fetched_bytes
        self.abort.clear()
        self.directory.mkdir(parents=True, exist_ok=True)
        objects, reachable = self.listing(store)
        done = self.complete_versions()  # a snapshot: each file is looked at again under its lock
        # The ranges each file is wanted for: a file another rank holds is sliced once it is free.
        wanted = self.wanted_ranges(objects, done, store, reachable, slicer)
        estimates = {
            info.name: total(subtract(wanted[info.name], self.held(info, done)))
            for info in objects
            if info.name in wanted
        }
        need = sum(estimates.values())  # at most: another rank may be fetching some of it
        if need and not reachable:
            raise StoreUnreachable(
                f"{self.location.url}: the store does not answer and the cache {self.directory} "
                f"lacks {need:,} bytes of what this load needs"
            )
        if need:
            self.check_space(need)
        bar = tqdm(
            total=need, unit="B", unit_scale=True, desc=self.location.url, disable=not progress
        )
        # Per file: bytes of the share (as far as known) and how many of them are on disk.
        shares = {name: total(ranges) for name, ranges in wanted.items()}
        on_disk = {name: shares[name] - estimates[name] for name in wanted}

        def count(name: str, share: int, held: int | None = None, fetched: int = 0) -> None:
            """The file's share, and its bytes on disk: `held`, or `fetched` more than counted."""
            with self.count_lock:
                shares[name] = share
                on_disk[name] = (on_disk.get(name, 0) if held is None else held) + fetched
                if on_progress is not None:
                    on_progress(sum(on_disk.values()), sum(shares.values()))

        if on_progress is not None:
            on_progress(sum(on_disk.values()), sum(shares.values()))
        with bar, ThreadPoolExecutor(self.parallel) as requests:

            def take(info: ObjectInfo) -> None:
                if info.name not in wanted:
                    wanted[info.name] = self.ranges_of(info, store, reachable, slicer)
                ranges = wanted[info.name]
                share = total(ranges)
                count(info.name, share, held=share - total(subtract(ranges, self.held(info, done))))

                def advance(fetched: int) -> None:
                    bar.update(fetched)
                    count(info.name, share, fetched=fetched)

                fetched = self.fetch_file(info, ranges, store, reachable, requests, advance)
                count(info.name, share, held=share)  # also what another rank fetched meanwhile
                with self.count_lock:  # what it took, once another rank has fetched its share
                    bar.total += fetched - estimates.get(info.name, 0)
                    bar.refresh()

            self.each_locked(
                [o for o in objects if o.name not in wanted or done.get(o.name) != o.version],
                take,
            )
        return Fetched(
            self.view(objects, wanted),
            self.fetched_bytes - fetched_before,
            sum(total(ranges) for ranges in wanted.values()),
            sum(o.size for o in objects),
            time.perf_counter() - started,
        )

    # -- steps --------------------------------------------------------------------------------------

    def listing(self, store: Store) -> tuple[list[ObjectInfo], bool]:
        manifest = self.directory / "manifest.json"
        try:
            objects = store.list()
        except StoreUnreachable as error:
            if not manifest.is_file():
                raise StoreUnreachable(
                    f"{error}; the cache {self.directory} holds no copy to serve instead"
                ) from error
            listed = json.loads(manifest.read_text())
            return [ObjectInfo.from_json(o) for o in listed], False
        if not objects:
            raise SourceError(f"{self.location.url}: no objects under this prefix")
        listed = json.dumps([o.to_json() for o in objects], indent=1)
        with self.index_lock():
            if manifest.is_file() and manifest.read_text() != listed:
                # Views of the old listing would keep its replaced files' disk space alive.
                shutil.rmtree(self.directory / "views", ignore_errors=True)
            write_atomically(manifest, listed)
        return objects, True

    def recorded_versions(self) -> dict[str, str]:
        try:
            return json.loads((self.directory / "complete.json").read_text())
        except (OSError, ValueError):
            return {}

    def complete_versions(self) -> dict[str, str]:
        """Name -> version of the verified files in complete/ (a file deleted by hand is not)."""
        versions = self.recorded_versions()
        return {n: v for n, v in versions.items() if (self.directory / "complete" / n).is_file()}

    def completed(self, info: ObjectInfo) -> bool:
        return (
            self.recorded_versions().get(info.name) == info.version
            and (self.directory / "complete" / info.name).is_file()
        )

    def held(self, info: ObjectInfo, done: dict[str, str]) -> Ranges:
        """What the cache holds of `info` now (read without its lock: a hint, never a promise)."""
        if done.get(info.name) == info.version:
            return [(0, info.size)]
        return journalled(journal_of(self.partial_path(info)), info)

    def partial_path(self, info: ObjectInfo) -> Path:
        return self.directory / "partial" / info.name

    def index_lock(self) -> FileLock:
        return FileLock(self.directory / ".lock")

    def file_lock(self, info: ObjectInfo) -> FileLock:
        path = self.directory / "locks" / f"{info.name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(path)

    def locked(
        self, info: ObjectInfo, job: Callable[[ObjectInfo], None], blocking: bool
    ) -> ObjectInfo | None:
        """job(info) under the file's lock; or, when another process holds it and `blocking` is
        False, `info` back, not done."""
        lock = self.file_lock(info)
        try:
            lock.acquire(blocking=blocking)
        except Timeout:
            return info
        try:
            job(info)
        finally:
            lock.release()
        return None

    def each_locked(self, objects: list[ObjectInfo], job: Callable[[ObjectInfo], None]) -> None:
        """job(info) under each file's lock, `parallel` files at a time: first the files no other
        process holds, then the others as their holders let go."""
        with ThreadPoolExecutor(self.parallel) as files:
            busy = self.run_all(files, [(self.locked, info, job, False) for info in objects])
            self.run_all(files, [(self.locked, info, job, True) for info in busy if info])

    def wanted_ranges(
        self,
        objects: list[ObjectInfo],
        done: dict[str, str],
        store: Store,
        reachable: bool,
        slicer: Slicer | None,
    ) -> dict[str, Ranges]:
        """The ranges wanted of each file that needs no reading, or whose lock is free now (the
        slicer reads headers through the cache); the rest are sliced when their turn comes."""
        wanted = {
            info.name: [(0, info.size)] if info.size else []
            for info in objects
            if slicer is None or done.get(info.name) == info.version
        }

        def slice_one(info: ObjectInfo) -> None:
            wanted[info.name] = self.ranges_of(info, store, reachable, slicer)

        with ThreadPoolExecutor(self.parallel) as files:
            self.run_all(
                files,
                [
                    (self.locked, info, slice_one, False)
                    for info in objects
                    if info.name not in wanted
                ],
            )
        return wanted

    def ranges_of(
        self, info: ObjectInfo, store: Store, reachable: bool, slicer: Slicer | None
    ) -> Ranges:
        """The ranges of `info` the caller needs; its file lock is held."""
        whole = [(0, info.size)] if info.size else []
        if slicer is None or self.completed(info):
            return whole
        partial = PartialFile(self.partial_path(info), info)
        try:

            def read(start: int, stop: int) -> bytes:
                self.fetch_ranges(partial, [(start, stop)], store, reachable)
                return partial.read(start, stop)

            return merge(slicer(info, read))
        finally:
            partial.close()

    def fetch_file(
        self,
        info: ObjectInfo,
        ranges: Ranges,
        store: Store,
        reachable: bool,
        requests: Executor,
        advance: Callable[[int], None],
    ) -> int:
        """The missing parts of `ranges` of one file, in chunks through `requests`, then verified
        and published if the file is whole; its file lock is held. Returns the bytes fetched."""
        if self.completed(info):  # fetched and published by the rank that held it before
            return 0
        partial = PartialFile(self.partial_path(info), info)
        try:
            chunks = split(subtract(ranges, partial.have), self.chunk_bytes)
            if chunks and not reachable:
                raise StoreUnreachable(
                    f"{self.location.url} ({info.name}): the store does not answer and the "
                    f"cache {self.directory} does not hold the bytes needed"
                )
            if chunks:
                self.check_space(total(chunks))

            def fetch_one(start: int, stop: int) -> None:
                advance(self.fetch_chunk(partial, start, stop, store))

            self.run_all(requests, [(fetch_one, start, stop) for start, stop in chunks])
            # Offline, a whole file waits in partial/ (the view serves it like a slice): S3 asks
            # the store for a multipart upload's part sizes to check it.
            if partial.complete and reachable:
                partial.close()
                self.publish(partial, store.checksum(info))
            return total(chunks)
        finally:
            partial.close()

    def fetch_ranges(
        self, partial: PartialFile, ranges: Ranges, store: Store, reachable: bool
    ) -> None:
        """The missing parts of `ranges` of one file, one request after the other (headers)."""
        todo = split(subtract(merge(ranges), partial.have), self.chunk_bytes)
        if todo and not reachable:
            raise StoreUnreachable(
                f"{self.location.url} ({partial.info.name}): the store does not answer and the "
                f"cache {self.directory} does not hold the bytes needed"
            )
        for start, stop in todo:
            self.fetch_chunk(partial, start, stop, store)

    def fetch_chunk(self, partial: PartialFile, start: int, stop: int, store: Store) -> int:
        if self.abort.is_set():
            raise SourceError(f"{self.location.url}: stopped, another request failed")
        data = store.read(partial.info, start, stop)
        if len(data) != stop - start:
            raise SourceError(
                f"{self.location.url} ({partial.info.name}): asked for bytes {start}-{stop - 1}, "
                f"got {len(data)} bytes"
            )
        try:
            partial.write(start, data)
        except OSError as error:
            raise self.disk_error(error) from error
        with self.count_lock:
            self.fetched_bytes += len(data)
        return len(data)

    def publish(self, partial: PartialFile, checksum: Checksum | None) -> None:
        """Verifies a fully fetched file and renames it into complete/; its file lock is held."""
        info = partial.info
        try:
            verify(partial.data, info, checksum, self.location.url)
        except SourceError:
            partial.data.unlink(missing_ok=True)
            partial.journal.unlink(missing_ok=True)
            raise
        target = self.directory / "complete" / info.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial.data, target)
        partial.journal.unlink(missing_ok=True)
        with self.index_lock():
            done = self.complete_versions()
            done[info.name] = info.version
            write_atomically(self.directory / "complete.json", json.dumps(done, indent=1))

    def view(self, objects: list[ObjectInfo], wanted: dict[str, Ranges]) -> Path:
        """complete/ when every file is there, else a folder of hard links to complete and partial
        files (hard, so that a partial file another rank completes and renames stays reachable)."""
        single = len(objects) == 1 and objects[0].key == self.location.prefix
        done = self.complete_versions()
        if all(done.get(o.name) == o.version for o in objects):
            complete = self.directory / "complete"
            return complete / objects[0].name if single else complete
        key = hashlib.sha256(json.dumps(sorted(wanted.items())).encode()).hexdigest()[:16]
        view = self.directory / "views" / key
        targets = {
            info.name: (self.directory / "complete" / info.name)
            if done.get(info.name) == info.version
            else self.partial_path(info)
            for info in objects
        }
        # Another rank with the same share may be opening this view now: rebuild it only if stale.
        if not all(same_file(view / name, target) for name, target in targets.items()):
            staging = view.with_name(f"{key}.{os.getpid()}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            for name, target in targets.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(target, staging / name)
                except FileNotFoundError:  # published by another rank since `done` was read
                    os.link(self.directory / "complete" / name, staging / name)
            shutil.rmtree(view, ignore_errors=True)
            os.replace(staging, view)
        return view / objects[0].name if single else view

    def run_all(self, pool: Executor, calls: list[tuple]) -> list:
        """Each call (function, *args) in `pool`; their results, in order. The first failure stops
        the rest (calls not started are cancelled, fetches stop before their next request; what was
        written stays journalled) and is raised."""
        jobs: list[Future] = [pool.submit(*call) for call in calls]
        try:
            wait(jobs, return_when=FIRST_EXCEPTION)
            for job in jobs:
                if job.done() and not job.cancelled() and job.exception() is not None:
                    raise job.exception()  # type: ignore[misc]
            return [job.result() for job in jobs]
        except BaseException:
            self.abort.set()
            for job in jobs:
                job.cancel()
            raise

    # -- disk ---------------------------------------------------------------------------------------

    def check_space(self, need: int) -> None:
        free = shutil.disk_usage(self.directory).free
        if need > free:
            raise SourceError(
                f"{self.location.url}: the cache {self.directory} needs {need:,} more bytes but "
                f"its disk has {free:,} free; free space or pass another --cache-dir"
            )

    def disk_error(self, error: OSError) -> SourceError:
        if error.errno == errno.ENOSPC:
            return SourceError(
                f"{self.location.url}: the cache {self.directory} ran out of disk space; the "
                "partial copy is kept and resumes once space is freed"
            )
        return SourceError(f"{self.location.url}: cannot write the cache {self.directory}: {error}")


def same_file(link: Path, target: Path) -> bool:
    try:
        return os.path.samefile(link, target)
    except OSError:
        return False


def write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)
