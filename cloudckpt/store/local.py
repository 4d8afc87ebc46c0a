"""Local-filesystem backend, so the same writer/reader/manager work on a path.

Keys are absolute paths. Writes go to a temporary file that is renamed into
place, so a reader never sees a half-written object; ``if_absent`` uses
``os.link``, which fails atomically if the target exists. Multipart parts are
kept as files under ``<dir>/.cloudckpt-uploads/<upload-id>/`` until completed.
"""

from __future__ import annotations

import builtins
import datetime as _dt
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping, Sequence

from cloudckpt import crc
from cloudckpt.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransferError,
    UnsafePathError,
)
from cloudckpt.store.base import Body, MultipartUpload, ObjectInfo, ObjectStore, PartResult, Scatter

__all__ = ["LocalStore"]

_UPLOADS = ".cloudckpt-uploads"


class LocalStore(ObjectStore):
    """An :class:`ObjectStore` whose keys are absolute local paths."""

    scheme = "file"
    min_part_size = 1

    def __init__(self, root: str = "/") -> None:
        super().__init__("")
        self.root = root

    def __repr__(self) -> str:
        return f"LocalStore(root={self.root!r})"

    def url(self, key: str) -> str:
        return key

    def check_bucket(self) -> None:
        if not os.path.isdir(self.root):
            raise BucketNotFoundError(f"directory {self.root} does not exist; create it first")

    def _write_tmp(self, key: str, body: Body, crc32c: int, tmp: str | None = None) -> tuple[str, int]:
        """Write ``body`` to a temporary file, checking its CRC32C as a server would."""
        tmp = tmp or f"{key}.tmp-{uuid.uuid4().hex}"
        got, size = 0, 0
        try:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            with open(tmp, "wb") as f:
                for seg in body:
                    got = crc.crc32c_extend(got, seg)
                    size += f.write(seg)
        except PermissionError as exc:
            raise AccessDeniedError(f"cannot write {key}: permission denied") from exc
        except OSError as exc:
            raise TransferError(f"cannot write {key}: {exc}") from exc
        if got != crc32c:
            os.unlink(tmp)
            raise IntegrityError(f"CRC32C of the data written to {key} is {got:08x}, the caller sent "
                                 f"{crc32c:08x}: the buffer changed while it was written; nothing was stored")
        return tmp, size

    def _publish(self, tmp: str, key: str, if_absent: bool) -> None:
        if if_absent:
            try:
                os.link(tmp, key)
            except FileExistsError as exc:
                raise PreconditionFailedError(f"{key} already exists (conditional write refused)") from exc
            finally:
                os.unlink(tmp)
        else:
            os.replace(tmp, key)

    def put(
        self,
        key: str,
        body: Body,
        *,
        crc32c: int,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        tmp, _ = self._write_tmp(key, body, crc32c)
        self._publish(tmp, key, if_absent)
        return ObjectInfo(key=key, size=os.path.getsize(key), crc32c=crc32c)

    @staticmethod
    def _open_regular(key: str) -> int:
        """A read-only descriptor of ``key``, which must be a regular file.

        Opened non-blocking, then checked with fstat: a FIFO or device planted
        under an object's name is refused at once instead of blocking the read
        forever (or streaming without end).
        """
        try:
            fd = os.open(key, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"{key} does not exist") from exc
        except IsADirectoryError as exc:
            raise ObjectNotFoundError(f"{key} is a directory, not an object") from exc
        except PermissionError as exc:
            raise AccessDeniedError(f"cannot read {key}: permission denied") from exc
        except OSError as exc:
            raise TransferError(f"cannot open {key}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{key} is not a regular file (a FIFO, device or socket under an object's "
                                      "name); refusing to read it. Remove it from the checkpoint directory")
            # Regular files ignore O_NONBLOCK; clear it anyway so reads behave normally.
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def get(self, key: str, *, max_size: int | None = None) -> bytes:
        fd = self._open_regular(key)
        with open(fd, "rb", closefd=True) as f:
            size = os.fstat(f.fileno()).st_size
            if max_size is not None and size > max_size:
                raise self.too_large(key, size, max_size)
            if max_size is None:
                return f.read()
            # Never ask read() for max_size bytes: it allocates what it is asked for up front.
            data = f.read(min(size, max_size) + 1)
            if len(data) > max_size:
                raise self.too_large(key, len(data), max_size)
            return data

    def get_ranges_into(self, key: str, start: int, views: Sequence[tuple[int, memoryview | None]]) -> None:
        """Read each view's bytes straight into it (one open; the bytes between views are not read)."""
        plan = Scatter(start, views)
        if not plan.size:
            return
        fd = self._open_regular(key)
        with open(fd, "rb", buffering=0, closefd=True) as f:
            for pos, n, view in plan.parts:
                if view is None:
                    continue
                f.seek(start + pos)
                got = 0
                while got < n:
                    k = f.readinto(view[got:])
                    if not k:
                        raise TransferError(f"short read of {key}: wanted bytes [{start + pos}, {start + pos + n}), "
                                            f"got {got}")
                    got += k

    def get_range(self, key: str, start: int, out: memoryview) -> None:
        out = memoryview(out).cast("B")
        fd = self._open_regular(key)
        with open(fd, "rb", buffering=0, closefd=True) as f:
            f.seek(start)
            got = 0
            while got < out.nbytes:
                k = f.readinto(out[got:])
                if not k:
                    break
                got += k
        if got != out.nbytes:
            raise TransferError(f"short read of {key}: wanted bytes [{start}, {start + out.nbytes}), got {got}")

    def head(self, key: str) -> ObjectInfo | None:
        return self._stat(key, with_tag=False)

    @staticmethod
    def _stat(key: str, *, with_tag: bool) -> ObjectInfo | None:
        """Size and mtime of a regular file (None if missing or not a file); ``with_tag``: an inode ETag too."""
        try:
            st = os.stat(key)
        except FileNotFoundError:
            return None
        if not os.path.isfile(key):
            return None
        return ObjectInfo(key=key, size=st.st_size, etag=_file_tag(st) if with_tag else None,
                          last_modified=_dt.datetime.fromtimestamp(st.st_mtime, tz=_dt.timezone.utc))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # A prefix is a path prefix, not necessarily a directory.
        base = prefix if prefix.endswith("/") else os.path.dirname(prefix)
        if not os.path.isdir(base):
            return
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != _UPLOADS]
            for name in filenames:
                path = os.path.join(dirpath, name)
                if path.startswith(prefix) and ".tmp-" not in name:
                    found.append(path)
        for path in sorted(found):
            info = self.head(path)
            if info is not None:
                yield info

    def list_prefixes(self, prefix: str) -> builtins.list[str]:
        base = prefix if prefix.endswith("/") else os.path.dirname(prefix) + "/"
        if not os.path.isdir(base):
            return []
        return sorted(
            os.path.join(base, d) + "/"
            for d in os.listdir(base)
            if d != _UPLOADS and os.path.isdir(os.path.join(base, d)) and os.path.join(base, d).startswith(prefix)
        )

    def delete(self, key: str) -> None:
        try:
            os.unlink(key)
        except FileNotFoundError:
            pass

    # -- multipart ---------------------------------------------------------------
    def _upload_dir(self, key: str, upload_id: str) -> str:
        return os.path.join(os.path.dirname(key), _UPLOADS, upload_id)

    def create_multipart(self, key: str, *, metadata: Mapping[str, str] | None = None) -> str:
        upload_id = uuid.uuid4().hex
        d = self._upload_dir(key, upload_id)
        try:
            os.makedirs(d)
        except OSError as exc:
            raise TransferError(f"cannot start an upload of {key}: {exc}") from exc
        with open(os.path.join(d, "key.json"), "w") as f:
            json.dump({"key": key, "initiated": _dt.datetime.now(_dt.timezone.utc).isoformat()}, f)
        return upload_id

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body, *, crc32c: int) -> PartResult:
        d = self._upload_dir(key, upload_id)
        if not os.path.isdir(d):
            raise ObjectNotFoundError(f"multipart upload {upload_id} of {key} does not exist (aborted?)")
        path = os.path.join(d, f"part-{part_number:05d}")
        _, size = self._write_tmp(key, body, crc32c, tmp=path + ".tmp")
        os.replace(path + ".tmp", path)
        return PartResult(part_number=part_number, etag=f"{crc32c:08x}-{size}", size=size, crc32c=crc32c)

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartResult], *, if_absent: bool = False
    ) -> ObjectInfo:
        d = self._upload_dir(key, upload_id)
        if not os.path.isdir(d):
            raise ObjectNotFoundError(f"multipart upload {upload_id} of {key} does not exist (aborted?)")
        ordered = sorted(parts, key=lambda p: p.part_number)
        tmp = f"{key}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as out:
            for p in ordered:
                with open(os.path.join(d, f"part-{p.part_number:05d}"), "rb") as src:
                    shutil.copyfileobj(src, out, 16 * 1024 * 1024)
        self._publish(tmp, key, if_absent)
        shutil.rmtree(d, ignore_errors=True)
        self._cleanup_uploads_dir(key)
        whole = crc.combine_all((p.crc32c, p.size) for p in ordered)
        return ObjectInfo(key=key, size=sum(p.size for p in ordered), crc32c=whole)

    def _cleanup_uploads_dir(self, key: str) -> None:
        try:
            os.rmdir(os.path.join(os.path.dirname(key), _UPLOADS))
        except OSError:
            pass  # not empty: other uploads in flight

    def abort_multipart(self, key: str, upload_id: str) -> None:
        shutil.rmtree(self._upload_dir(key, upload_id), ignore_errors=True)
        self._cleanup_uploads_dir(key)

    def list_multipart_uploads(self, prefix: str) -> builtins.list[MultipartUpload]:
        base = prefix if prefix.endswith("/") else os.path.dirname(prefix)
        out: list[MultipartUpload] = []
        if not os.path.isdir(base):
            return out
        for dirpath, dirnames, _ in os.walk(base):
            if os.path.basename(dirpath) != _UPLOADS:
                continue
            for upload_id in dirnames:
                try:
                    with open(os.path.join(dirpath, upload_id, "key.json")) as f:
                        info = json.load(f)
                except (OSError, ValueError):
                    continue
                if info["key"].startswith(prefix):
                    out.append(MultipartUpload(key=info["key"], upload_id=upload_id,
                                               initiated=_dt.datetime.fromisoformat(info["initiated"])))
            dirnames[:] = []
        return out

    # -- copies (incremental saves) ------------------------------------------------------
    server_side_copy = True
    server_side_range_copy = True
    max_copy_object_size = 1 << 62

    def copy_probe(self, key: str) -> ObjectInfo | None:
        """Like :meth:`head`, with an ETag made of inode, size and mtime (a replaced file gets a new one)."""
        return self._stat(key, with_tag=True)

    def _copy_range(self, src_key: str, dst_path: str, start: int, end: int | None, if_match: str | None) -> None:
        """Write ``[start, end)`` of ``src_key`` to ``dst_path`` inside the kernel (copy_file_range/reflink)."""
        try:
            src = open(src_key, "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"copy source {src_key} does not exist") from exc
        with src:
            st = os.fstat(src.fileno())
            if if_match is not None and _file_tag(st) != if_match:
                raise PreconditionFailedError(f"copy source {src_key} changed since it was checked; nothing was copied")
            end = st.st_size if end is None else end
            if st.st_size < end:
                raise ObjectNotFoundError(f"copy source {src_key} has {st.st_size} bytes, fewer than the {end} "
                                          "the copy needs (truncated?)")
            try:
                os.makedirs(os.path.dirname(dst_path), exist_ok=True)
                with open(dst_path, "wb") as dst:
                    _kernel_copy(src.fileno(), dst.fileno(), start, end - start)
            except PermissionError as exc:
                raise AccessDeniedError(f"cannot write {dst_path}: permission denied") from exc
            except OSError as exc:
                raise TransferError(f"cannot copy {src_key} to {dst_path}: {exc}") from exc

    def copy_object(self, src_key: str, dst_key: str, *, if_match: str | None = None,
                    crc32c: int | None = None) -> ObjectInfo:
        """Copy a whole file in the kernel, then rename it into place (readers never see half of it)."""
        tmp = f"{dst_key}.tmp-{uuid.uuid4().hex}"
        try:
            self._copy_range(src_key, tmp, 0, None, if_match)
            self._publish(tmp, dst_key, False)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return ObjectInfo(key=dst_key, size=os.path.getsize(dst_key), crc32c=crc32c)

    def upload_part_copy(self, key: str, upload_id: str, part_number: int, src_key: str, start: int, end: int,
                         *, crc32c: int | None = None, if_match: str | None = None) -> PartResult:
        """A part file filled from ``[start, end)`` of ``src_key`` in the kernel."""
        d = self._upload_dir(key, upload_id)
        if not os.path.isdir(d):
            raise ObjectNotFoundError(f"multipart upload {upload_id} of {key} does not exist (aborted?)")
        if crc32c is None:
            raise TransferError(f"a copied part of {key} needs the CRC32C of its source range")
        path = os.path.join(d, f"part-{part_number:05d}")
        self._copy_range(src_key, path + ".tmp", start, end, if_match)
        os.replace(path + ".tmp", path)
        return PartResult(part_number=part_number, etag=f"{crc32c:08x}-{end - start}", size=end - start,
                          crc32c=crc32c)


def _file_tag(st: os.stat_result) -> str:
    """Identifies one version of a file: a rename-into-place or rewrite changes it."""
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _kernel_copy(src: int, dst: int, start: int, length: int) -> None:
    """Copy ``length`` bytes at ``start`` of ``src`` to ``dst`` without passing them through user space
    where the OS allows (``copy_file_range``, which reflinks on btrfs/XFS), else with a plain copy."""
    done = 0
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            while done < length:
                n = copy_range(src, dst, length - done, start + done, done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # EXDEV on old kernels, ENOSYS, EINVAL on some file systems: copy in user space
    while done < length:
        chunk = os.pread(src, min(16 * 1024 * 1024, length - done), start + done)
        if not chunk:
            raise TransferError(f"copy source ended {length - done} bytes early")
        os.pwrite(dst, chunk, done)
        done += len(chunk)
