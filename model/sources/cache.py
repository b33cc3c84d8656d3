"""The node-local cache: one copy of a remote checkpoint per node, shared by the ranks on it.

    CACHE_DIR/<scheme>/<container>[/@revision][/prefix]/
        manifest.json       the last listing (names, sizes, versions, checksums)
        complete/NAME       files fetched whole and verified; complete.json maps them to versions
        partial/NAME        sparse files being fetched (or sliced for one rank), with NAME.ranges,
                            the journal of byte ranges written (first line: version and size)
        views/KEY/NAME      symlinks a reader opens when some files are only partly fetched
        .lock               held while fetching, so the ranks of a node fetch each range once

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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from grokserve.model.sources.errors import SourceError, StoreUnreachable
from grokserve.model.sources.location import Location
from grokserve.model.sources.ranges import Ranges, merge, split, subtract, total
from grokserve.model.sources.store import ObjectInfo, Store
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


# Told (bytes of the caller's share on disk: found in the cache or fetched so far, the share's
# bytes) once the share is known and after every chunk, so that a waiting caller can show progress.
Progress = Callable[[int, int], None]

# Given a file and a way to read its bytes [start, stop) (fetched through the cache), the ranges a
# caller needs of it. Without a slicer every file is fetched whole.
Slicer = Callable[[ObjectInfo, Callable[[int, int], bytes]], Ranges]


class PartialFile:
    """A sparse local copy of one object and the journal of the ranges it holds."""

    def __init__(self, data: Path, info: ObjectInfo) -> None:
        self.data = data
        self.info = info
        self.journal = data.with_name(data.name + ".ranges")
        self.lock = threading.Lock()
        self.have: Ranges = self.read_journal()
        data.parent.mkdir(parents=True, exist_ok=True)
        if not self.have:
            # A new inode: views of an older version keep their hard links to the old one.
            data.unlink(missing_ok=True)
            self.journal.write_text(json.dumps({"version": info.version, "size": info.size}) + "\n")
        with open(data, "ab") as file:  # sparse: holes cost no disk until written
            file.truncate(info.size)
        self.fd = os.open(data, os.O_RDWR)

    def read_journal(self) -> Ranges:
        try:
            first, *lines = self.journal.read_text().splitlines()
            header = json.loads(first)
        except (OSError, ValueError):
            return []
        if header != {"version": self.info.version, "size": self.info.size}:
            return []  # another version of the object: start again
        ranges = []
        for line in lines:
            parts = line.split()
            # A line cut by a kill is skipped, or (its stop cut short) claims less than was written.
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                ranges.append((int(parts[0]), int(parts[1])))
        return merge(ranges)

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
        os.close(self.fd)


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
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(self.directory / ".lock"):
            objects, reachable = self.listing(store)
            done = self.complete_versions()
            partials: dict[str, PartialFile] = {}
            try:
                wanted = self.wanted_ranges(objects, done, partials, store, reachable, slicer)
                self.fetch_missing(wanted, partials, store, reachable, progress, on_progress)
                self.publish(partials, done)
                path = self.view(objects, wanted, done)
            finally:
                for partial in partials.values():
                    if partial.fd >= 0:
                        partial.close()
        return Fetched(
            path,
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
        if manifest.is_file() and manifest.read_text() != listed:
            # Views of the old listing would keep its replaced files' disk space alive.
            shutil.rmtree(self.directory / "views", ignore_errors=True)
        write_atomically(manifest, listed)
        return objects, True

    def complete_versions(self) -> dict[str, str]:
        """Name -> version of the verified files in complete/ (a file deleted by hand is not)."""
        try:
            versions = json.loads((self.directory / "complete.json").read_text())
        except (OSError, ValueError):
            return {}
        return {n: v for n, v in versions.items() if (self.directory / "complete" / n).is_file()}

    def wanted_ranges(
        self,
        objects: list[ObjectInfo],
        done: dict[str, str],
        partials: dict[str, PartialFile],
        store: Store,
        reachable: bool,
        slicer: Slicer | None,
    ) -> dict[str, Ranges]:
        def ranges_of(info: ObjectInfo) -> tuple[ObjectInfo, Ranges]:
            whole = [(0, info.size)] if info.size else []
            if slicer is None or done.get(info.name) == info.version:
                return info, whole

            def read(start: int, stop: int) -> bytes:
                partial = self.partial(info, partials)
                self.fetch_ranges(partial, [(start, stop)], store, reachable)
                return partial.read(start, stop)

            return info, merge(slicer(info, read))

        for info in objects:  # opened here, one thread, so that lookups below never race
            if done.get(info.name) != info.version:
                self.partial(info, partials)
        with ThreadPoolExecutor(self.parallel) as pool:
            return {info.name: ranges for info, ranges in pool.map(ranges_of, objects)}

    def partial(self, info: ObjectInfo, partials: dict[str, PartialFile]) -> PartialFile:
        if info.name not in partials:
            partials[info.name] = PartialFile(self.directory / "partial" / info.name, info)
        return partials[info.name]

    def fetch_missing(
        self,
        wanted: dict[str, Ranges],
        partials: dict[str, PartialFile],
        store: Store,
        reachable: bool,
        progress: bool,
        on_progress: Progress | None = None,
    ) -> None:
        """Every missing range of every file, in chunks, `parallel` requests at a time."""
        chunks = [
            (partials[name], start, stop)
            for name, ranges in wanted.items()
            if name in partials
            for start, stop in split(subtract(ranges, partials[name].have), self.chunk_bytes)
        ]
        need = sum(stop - start for _, start, stop in chunks)
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
        share = sum(total(ranges) for ranges in wanted.values())
        done = share - need
        if on_progress is not None:
            on_progress(done, share)
        with bar, ThreadPoolExecutor(self.parallel) as pool:
            jobs = [pool.submit(self.fetch_chunk, *chunk, store) for chunk in chunks]
            try:
                for job in as_completed(jobs):
                    fetched = job.result()
                    bar.update(fetched)
                    done += fetched
                    if on_progress is not None:
                        on_progress(done, share)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # what is written stays journalled
                raise

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

    def publish(self, partials: dict[str, PartialFile], done: dict[str, str]) -> None:
        """Verifies each fully fetched file and renames it into complete/."""
        for name, partial in partials.items():
            if not partial.complete:
                continue
            partial.close()
            partial.fd = -1
            try:
                verify(partial.data, partial.info, self.location.url)
            except SourceError:
                partial.data.unlink(missing_ok=True)
                partial.journal.unlink(missing_ok=True)
                raise
            target = self.directory / "complete" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial.data, target)
            partial.journal.unlink(missing_ok=True)
            done[name] = partial.info.version
            write_atomically(self.directory / "complete.json", json.dumps(done, indent=1))

    def view(
        self, objects: list[ObjectInfo], wanted: dict[str, Ranges], done: dict[str, str]
    ) -> Path:
        """complete/ when every file is there, else a folder of hard links to complete and partial
        files (hard, so that a partial file another rank completes and renames stays reachable)."""
        single = len(objects) == 1 and objects[0].key == self.location.prefix
        if all(done.get(o.name) == o.version for o in objects):
            complete = self.directory / "complete"
            return complete / objects[0].name if single else complete
        key = hashlib.sha256(json.dumps(sorted(wanted.items())).encode()).hexdigest()[:16]
        view = self.directory / "views" / key
        targets = {
            info.name: self.directory
            / ("complete" if done.get(info.name) == info.version else "partial")
            / info.name
            for info in objects
        }
        # Another rank with the same share may be opening this view now: rebuild it only if stale.
        if not all(same_file(view / name, target) for name, target in targets.items()):
            staging = view.with_name(f"{key}.{os.getpid()}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            for name, target in targets.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                os.link(target, staging / name)
            shutil.rmtree(view, ignore_errors=True)
            os.replace(staging, view)
        return view / objects[0].name if single else view

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
