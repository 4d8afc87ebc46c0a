"""The ``cloudckpt`` command: inspect, verify, copy and clean up checkpoints.

This module only parses arguments and renders results (text or ``--json``);
the operations themselves are library functions in :mod:`cloudckpt.ops`
(and :func:`cloudckpt.verify.verify`). ``rm`` and ``gc`` ask before deleting
on a terminal, need ``--yes`` without one, and change nothing with ``--dry-run``.

Run ``cloudckpt --help`` or see docs/configuration.md. Exit codes (stable, for scripts):

====  ===========================================================
0     success
1     verification found problems; a checkpoint is corrupt, incomplete or unsafe (bad object names,
      copied bytes that fail their checksum)
2     usage error, bad URI, not a checkpoint, destructive command without --yes and no terminal
3     not found (no checkpoint, object or bucket; local ENOENT)
4     already exists (destination checkpoint, without --overwrite; local EEXIST)
5     access denied, endpoint unreachable, network/transfer failure (local EACCES, EPERM, EROFS)
6     a package the command needs is missing (the message names the pip extra)
7     the local file system refused a write (ENOSPC, EDQUOT, EFBIG, ENAMETOOLONG, ENOTDIR, EISDIR,
      ELOOP, any other OS error) or a local destination holds a symlink where cp must write
10    unexpected error (rerun with --debug for the traceback)
130   interrupted (Ctrl-C)
====  ===========================================================
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import re
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["main", "exit_code_for", "parse_duration", "EXIT_CODES"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_EXISTS = 4
EXIT_ACCESS = 5
EXIT_MISSING = 6
EXIT_LOCAL_FS = 7
EXIT_UNEXPECTED = 10
EXIT_INTERRUPTED = 130
#: Meaning of every exit code (also in docs/configuration.md).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_PROBLEMS: "verification problems",
    EXIT_USAGE: "usage error or bad URI",
    EXIT_NOT_FOUND: "checkpoint, object or bucket not found",
    EXIT_EXISTS: "destination already exists",
    EXIT_ACCESS: "access denied, endpoint unreachable or network problem",
    EXIT_MISSING: "a needed package is not installed",
    EXIT_LOCAL_FS: "the local file system refused a write (no space, name too long, not a directory...)",
    EXIT_UNEXPECTED: "unexpected error",
    EXIT_INTERRUPTED: "interrupted",
}

MiB = 1024 * 1024
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CLIError(Exception):
    """An error with a message for the user and the exit code it maps to."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception raised by a command."""
    from cloudckpt import errors as e

    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, ImportError):
        return EXIT_MISSING
    if isinstance(exc, e.InvalidURIError):
        return EXIT_USAGE
    if isinstance(exc, (e.CheckpointExistsError, e.PreconditionFailedError)):
        return EXIT_EXISTS
    if isinstance(exc, (e.ObjectNotFoundError, e.BucketNotFoundError)):
        return EXIT_NOT_FOUND
    if isinstance(exc, (e.AccessDeniedError, e.EndpointUnreachableError, e.TransferError)):
        return EXIT_ACCESS
    if isinstance(exc, (e.IntegrityError, e.UnsafeMetadataError)):
        return EXIT_PROBLEMS
    if isinstance(exc, e.UnsafeDestinationError):
        return EXIT_LOCAL_FS
    if isinstance(exc, e.CloudCheckpointError):
        return EXIT_UNEXPECTED
    if isinstance(exc, OSError):
        return _os_error_code(exc)
    return EXIT_UNEXPECTED


def _os_error_code(exc: OSError) -> int:
    """The exit code of an error the operating system raised (see the module docstring)."""
    if isinstance(exc, ConnectionError):
        return EXIT_ACCESS
    code = exc.errno
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        return EXIT_NOT_FOUND
    if isinstance(exc, FileExistsError) or code == errno.EEXIST:
        return EXIT_EXISTS
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EXIT_ACCESS
    return EXIT_LOCAL_FS


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``30m``, ``2h``, ``7d``, ``1w`` (a bare number is seconds)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 30m, 2h, 7d or 0s")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _when(t: _dt.datetime | None) -> str:
    if t is None:
        return "-"
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


# -- output and progress ----------------------------------------------------------------


@dataclass
class _Out:
    """Where a command's results go: text for people, or one JSON document on stdout."""

    json: bool
    quiet: bool
    #: Show progress bars even when stderr is not a terminal.
    force_progress: bool = False

    def result(self, doc: Any, text: str | None) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, default=str))
        elif text:
            print(text)

    def info(self, text: str) -> None:
        """Chatter on stderr (suppressed by -q and --json)."""
        if not (self.quiet or self.json):
            print(text, file=sys.stderr)

    @property
    def progress_enabled(self) -> bool:
        """Bars on stderr: on a terminal unless -q/--json, or always with --progress."""
        return self.force_progress or (not (self.quiet or self.json) and sys.stderr.isatty())


class _Progress:
    """A tqdm bar of bytes, fed by the transfer engine's ``progress(n)`` callbacks (any thread)."""

    def __init__(self, desc: str, enabled: bool, total: int | None = None) -> None:
        self.desc = desc
        self.enabled = enabled
        self._bar: Any = None
        self._lock = threading.Lock()
        if total is not None:
            self.set_total(total)

    def set_total(self, total: int) -> None:
        """Create (or resize) the bar once the number of bytes is known."""
        if not self.enabled:
            return
        from tqdm import tqdm

        with self._lock:
            if self._bar is None:
                self._bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
                                 file=sys.stderr, leave=True, dynamic_ncols=True)
            else:
                self._bar.total = total
                self._bar.refresh()

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- shared helpers -----------------------------------------------------------------------


#: Store options the CLI takes as flags, by scheme (``--server-side-encryption`` -> ``server_side_encryption``).
_S3_FLAGS = ("endpoint_url", "region", "server_side_encryption", "sse_kms_key_id", "bucket_key_enabled",
             "request_payer", "expected_bucket_owner", "storage_class")
_GCS_FLAGS = ("endpoint_url", "project", "kms_key_name", "user_project", "storage_class")


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{flag} takes KEY=VALUE, got {item!r}", EXIT_USAGE)
        out[key] = value
    return out


def _store_options(args: argparse.Namespace, scheme: str) -> dict[str, Any]:
    """Global options that apply to ``scheme``'s store (checked against cloudckpt.options' table)."""
    from cloudckpt.options import split_options

    names = _S3_FLAGS if scheme == "s3" else _GCS_FLAGS if scheme == "gs" else ()
    given: dict[str, Any] = {k: getattr(args, k, None) for k in names}
    if scheme == "s3":
        key_file = getattr(args, "sse_customer_key_file", None)
        if key_file:
            try:
                with open(key_file, "rb") as f:
                    given["sse_customer_key"] = f.read().strip()
            except OSError as exc:
                raise CLIError(f"cannot read --sse-customer-key-file {key_file}: {exc.strerror}", EXIT_USAGE) from None
        given["object_tags"] = _pairs(getattr(args, "object_tag", None), "--object-tag")
        given["object_metadata"] = _pairs(getattr(args, "object_metadata", None), "--object-metadata")
    return dict(split_options({k: v for k, v in given.items() if v}, owner="cloudckpt").store)


def _open(args: argparse.Namespace, uri_text: str) -> tuple[Any, Any]:
    from cloudckpt.store import open_store
    from cloudckpt.uri import parse_uri

    uri = parse_uri(uri_text)
    return uri, open_store(uri, **_store_options(args, uri.scheme))


def _confirm(question: str) -> bool:
    # The question goes to stderr, so stdout stays one JSON document with --json.
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _allowed(args: argparse.Namespace, out: _Out, question: str) -> bool:
    """May a destructive command go ahead? ``--yes``, or a "y" on a terminal; without one, exit 2."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise CLIError(f"refusing to {question} without confirmation: pass --yes (or --dry-run to see what "
                       "would be deleted)", EXIT_USAGE)
    if _confirm(f"{question}?"):
        return True
    out.info("nothing deleted")
    return False


# -- ls -------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace, out: _Out) -> int:
    """List the checkpoints under a root, or the objects of one checkpoint."""
    from cloudckpt import ops

    uri, store = _open(args, args.uri)
    found = ops.list_uri(store, uri)
    if isinstance(found, ops.CheckpointListing):
        objects = [(o.name, _human(o.size), _when(o.modified)) for o in found.objects]
        state = "committed" if found.committed else "NOT committed (no .metadata)"
        pending = found.uploads_in_progress
        text = (_table(objects, ("OBJECT", "SIZE", "MODIFIED")) +
                f"\n{len(found.objects)} objects, {_human(found.bytes)}, {state}"
                + (f", {pending} multipart upload(s) in progress" if pending else ""))
        out.result(found.to_dict(), text)
        return EXIT_OK
    rows: list[tuple[str, ...]] = []
    for e in found.entries:
        if e.kind == "prefix":
            rows.append(("-", "-", _human(e.bytes), "-", e.uri + "/"))
        else:
            state = "yes" if e.committed else ("NO (uploading)" if e.uploads_in_progress else "NO")
            rows.append((str(e.step) if e.step is not None else "-", state, _human(e.bytes), _when(e.modified),
                         e.uri))
    n_ckpt = sum(1 for e in found.entries if e.kind == "checkpoint")
    n_committed = sum(1 for e in found.entries if e.committed)
    text = _table(rows, ("STEP", "COMMITTED", "SIZE", "MODIFIED", "URI")) + (
        f"\n{n_ckpt} checkpoints ({n_committed} committed)")
    out.result(found.to_dict(), text)
    return EXIT_OK


# -- info -----------------------------------------------------------------------------------


def _transfer_line(info: Any) -> list[str]:
    """How the save sent its bytes: uploaded vs copied inside the store (incremental saves)."""
    if info.uploaded_bytes is None and info.copied_bytes is None:
        return []
    line = (f"transfer    {_human(info.uploaded_bytes or 0)} uploaded, "
            f"{_human(info.copied_bytes or 0)} copied in the store")
    return [line + (f" from {info.base}" if info.base else " (full save)")]


def cmd_info(args: argparse.Namespace, out: _Out) -> int:
    """Describe a checkpoint: ranks, tensors, dtypes, shapes, bytes, creation time, writer."""
    from cloudckpt import ops

    uri, store = _open(args, args.uri)
    info = ops.checkpoint_info(store, uri)
    rows = [(i.key, i.kind if i.kind == "bytes" else i.dtype or "-",
             "-" if i.shape is None else "x".join(map(str, i.shape)) or "scalar",
             str(i.chunks), _human(i.bytes)) for i in info.items]
    ranks = info.ranks
    lines = [
        f"checkpoint  {uri}",
        f"created     {info.created or '-'}",
        f"writer      {info.writer}",
        f"ranks       {len(ranks)} ({', '.join(map(str, ranks)) if len(ranks) <= 16 else f'{ranks[0]}..{ranks[-1]}'})",
        f"objects     {info.objects} ({_human(info.stored_bytes)} stored)",
        f"tensors     {info.tensors} ({_human(info.tensor_bytes)}), byte items {info.byte_items}",
        f"checksums   {'CRC32C manifest present' if info.checksums else 'none (no manifest)'}",
        *_transfer_line(info),
    ]
    if info.missing:
        lines.append(f"MISSING     {len(info.missing)} referenced object(s), e.g. {info.missing[0]}: "
                     f"run `cloudckpt verify {uri}`")
    out.result(info.to_dict(), "\n".join(lines) + "\n\n" + _table(rows, ("KEY", "DTYPE", "SHAPE", "CHUNKS", "BYTES")))
    return EXIT_OK


# -- verify -----------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace, out: _Out) -> int:
    """Run :func:`cloudckpt.verify.verify`; exit 1 if it found problems."""
    from cloudckpt.uri import parse_uri
    from cloudckpt.verify import verify

    uri = parse_uri(args.uri)
    bar = _Progress("verify", out.progress_enabled)
    try:
        report = verify(uri, deep=not args.shallow, max_concurrency=args.max_concurrency, progress=bar,
                        **_store_options(args, uri.scheme))
    finally:
        bar.close()
    lines = []
    if report.ok:
        if not out.quiet:
            what = "checksums and structure" if report.checksums_verified else "structure only (no checksums)"
            lines.append(f"OK: {report.uri}: {report.objects_checked} objects, {report.items_checked} items, "
                         f"{_human(report.bytes_checked)} checked ({what}{', records parsed' if report.deep else ''})")
    else:
        lines.append(f"PROBLEMS: {report.uri}: {len(report.problems)} problem(s)")
        lines.extend(f"  {p}" for p in report.problems)
    if not out.quiet:
        lines.extend(f"  note: {n}" for n in report.notes)
    out.result(report.to_dict(), "\n".join(lines))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


# -- cp ------------------------------------------------------------------------------------------


def cmd_cp(args: argparse.Namespace, out: _Out) -> int:
    """Copy a checkpoint between a bucket and a local directory (or between any two locations)."""
    from cloudckpt import ops
    from cloudckpt.transfer import TransferOptions

    src, sstore = _open(args, args.src)
    dst, dstore = _open(args, args.dst)
    opts = TransferOptions(max_concurrency=args.max_concurrency,
                           **({"part_size": args.part_size * MiB} if args.part_size else {}))
    bar = _Progress("copy", out.progress_enabled)
    try:
        result = ops.copy_checkpoint(sstore, src, dstore, dst, overwrite=args.overwrite, transfer_options=opts,
                                     progress=bar, on_total=bar.set_total)
    finally:
        bar.close()
    text = None if out.quiet else (
        f"copied {result.objects} objects ({_human(result.bytes)}) from {src} to {dst} in {result.seconds:.1f} s "
        f"({_human(result.bytes / max(result.seconds, 1e-9))}/s)")
    out.result(result.to_dict(), text)
    return EXIT_OK


# -- rm -------------------------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace, out: _Out) -> int:
    """Delete one checkpoint, commit objects first (asks first; ``--yes`` without a terminal)."""
    from cloudckpt import ops

    uri, store = _open(args, args.uri)
    plan = ops.plan_removal(store, uri)
    if plan.symlink:
        what = f"symbolic link {uri} (its target is not touched)"
    else:
        state = "committed checkpoint" if plan.committed else "UNCOMMITTED checkpoint"
        what = f"{state} {uri} ({plan.objects} objects, {_human(plan.bytes)})"
    if args.dry_run:
        out.result(dict(plan.to_dict(), dry_run=True), None if out.quiet else f"would delete {what}")
        return EXIT_OK
    if not _allowed(args, out, f"delete {what}"):
        return EXIT_OK
    ops.remove_checkpoint(store, plan)
    doc = dict(plan.to_dict(), deleted_objects=plan.objects, aborted_uploads=plan.uploads, dry_run=False)
    out.result(doc, None if out.quiet else f"deleted {what}")
    return EXIT_OK


# -- gc --------------------------------------------------------------------------------------------


def _gc_lines(plan: Any, verb_upload: str, verb_ckpt: str) -> list[str]:
    lines = [f"{verb_upload} incomplete upload of {u.key} (started {_when(u.initiated)})" for u in plan.uploads]
    lines += [f"{verb_ckpt} uncommitted checkpoint {c.uri} ({c.objects} objects, {_human(c.bytes)}, "
              f"last written {_when(c.modified)})" for c in plan.checkpoints]
    if plan.skipped_uploads:
        lines.append(f"skipped {plan.skipped_uploads} upload(s) whose start time the store does not report")
    return lines


def cmd_gc(args: argparse.Namespace, out: _Out) -> int:
    """Abort stale multipart uploads and delete stale uncommitted checkpoints under a root."""
    from cloudckpt import ops

    uri, store = _open(args, args.root)
    plan = ops.plan_gc(store, uri, args.older_than)
    if args.dry_run or plan.empty:
        lines = _gc_lines(plan, "would abort", "would delete") or [
            f"nothing to clean under {uri} (older than {args.older_than:g} s)"]
        out.result(dict(plan.to_dict(), dry_run=args.dry_run), None if out.quiet and not args.dry_run
                   else "\n".join(lines))
        return EXIT_OK
    question = (f"abort {len(plan.uploads)} upload(s) and delete {len(plan.checkpoints)} uncommitted "
                f"checkpoint(s) under {uri}")
    if not (args.yes or args.json or out.quiet):
        print("\n".join(_gc_lines(plan, "will abort", "will delete")), file=sys.stderr)
    if not _allowed(args, out, question):
        return EXIT_OK
    done = ops.run_gc(store, plan)
    lines = _gc_lines(done, "aborted", "deleted") or [f"nothing to clean under {uri}"]
    out.result(dict(done.to_dict(), dry_run=False), None if out.quiet else "\n".join(lines))
    return EXIT_OK


# -- demo ---------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, out: _Out) -> int:
    """Train, checkpoint asynchronously, crash, resume and verify (see cloudckpt.demo)."""
    from cloudckpt import demo

    try:
        summary = demo.run(steps=args.steps, every=args.every, size_mib=args.size_mib, nproc=args.nproc,
                           uri=args.uri, endpoint_url=args.endpoint_url, region=args.region, project=args.project,
                           log=out.info)
    except ValueError as exc:  # bad --steps/--every/--size-mib/--nproc
        raise CLIError(str(exc), EXIT_USAGE) from exc
    except demo.DemoError as exc:  # its message names the failing rank, the cause and the log tail
        raise CLIError(str(exc), EXIT_PROBLEMS) from exc
    out.result(summary, demo.format_summary(summary))
    return EXIT_OK if summary.get("verified") else EXIT_PROBLEMS


# -- parser ---------------------------------------------------------------------------------------------


def _add_globals(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Global options are accepted before and after the command; after it they
    # use SUPPRESS so they do not reset what was given before it.
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("global options")
    g.add_argument("--endpoint-url", default=d(None), metavar="URL",
                   help="S3-compatible or GCS emulator endpoint (default: AWS_ENDPOINT_URL(_S3) / "
                        "STORAGE_EMULATOR_HOST, else the public endpoint)")
    g.add_argument("--region", default=d(None), help="S3 region (s3:// only)")
    g.add_argument("--project", default=d(None), help="GCP project (gs:// only)")
    lock = p.add_argument_group("locked-down buckets (docs/configuration.md)")
    lock.add_argument("--server-side-encryption", default=d(None), choices=("AES256", "aws:kms", "aws:kms:dsse"),
                      help="S3 SSE on every object written")
    lock.add_argument("--sse-kms-key-id", default=d(None), metavar="KEY", help="S3 KMS key id or ARN")
    lock.add_argument("--bucket-key-enabled", action="store_true", default=d(None), help="S3 bucket keys for SSE-KMS")
    lock.add_argument("--sse-customer-key-file", default=d(None), metavar="PATH",
                      help="file holding the 32-byte S3 SSE-C key (raw or base64), sent on every read and write")
    lock.add_argument("--request-payer", default=d(None), choices=("requester",),
                      help="S3 requester-pays buckets: sent on every request")
    lock.add_argument("--expected-bucket-owner", default=d(None), metavar="ACCOUNT",
                      help="S3: every request fails unless the bucket belongs to this account")
    lock.add_argument("--storage-class", default=d(None), help="storage class of every object written (S3 or GCS)")
    lock.add_argument("--object-tag", action="append", default=d(None), metavar="KEY=VALUE",
                      help="S3 object tag on every object written (repeatable)")
    lock.add_argument("--object-metadata", action="append", default=d(None), metavar="KEY=VALUE",
                      help="S3 user metadata on every object written (repeatable)")
    lock.add_argument("--kms-key-name", default=d(None), metavar="NAME", help="GCS CMEK key for objects written")
    lock.add_argument("--user-project", default=d(None), metavar="PROJECT",
                      help="GCS requester pays: the project billed, sent on every request")
    g.add_argument("--json", action="store_true", default=d(False), help="machine-readable output on stdout")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="no progress bars or success chatter")
    g.add_argument("--progress", action="store_true", default=d(False),
                   help="show progress bars on stderr even when it is not a terminal (e.g. in CI logs)")
    g.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``cloudckpt`` command."""
    from cloudckpt import __version__

    parser = argparse.ArgumentParser(
        prog="cloudckpt",
        description="Inspect, verify, copy and clean up PyTorch DCP checkpoints on S3, GCS and local disk.",
        epilog="exit codes: " + ", ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + ". See docs/configuration.md.",
    )
    parser.add_argument("--version", action="version", version=f"cloudckpt {__version__}")
    _add_globals(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, fn: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_globals(p, suppress=True)
        p.set_defaults(func=fn)
        return p

    p = command("ls", cmd_ls, "list checkpoints under a root, or the objects of a checkpoint")
    p.add_argument("uri", help="root (s3://bucket/run) or checkpoint (s3://bucket/run/step-0000000100) URI")

    p = command("info", cmd_info, "ranks, tensors, dtypes, shapes, sizes, creation time and writer of a checkpoint")
    p.add_argument("uri")

    p = command("verify", cmd_verify, "check a checkpoint's structure, checksums and records without loading it")
    p.add_argument("uri")
    p.add_argument("--shallow", action="store_true",
                   help="skip parsing records (structure and checksums only)")
    p.add_argument("--max-concurrency", type=int, default=16, help="ranged reads in flight (default 16)")

    p = command("cp", cmd_cp, "copy a checkpoint: bucket -> local dir, local dir -> bucket (or bucket -> bucket)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--part-size", type=int, default=None, metavar="MIB",
                   help="multipart part / ranged read size in MiB (default 32)")

    p = command("rm", cmd_rm, "delete a checkpoint (.metadata first, so it is never half-committed)")
    p.add_argument("uri")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation (required without a TTY)")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, change nothing")

    p = command("gc", cmd_gc, "abort stale multipart uploads and delete stale uncommitted checkpoints under ROOT")
    p.add_argument("root")
    p.add_argument("--older-than", type=parse_duration, default=24 * 3600.0, metavar="AGE",
                   help="only touch things at least this old: 30m, 2h, 7d, 0s (default 24h)")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation (required without a TTY)")
    p.add_argument("--dry-run", action="store_true", help="list what would be done, change nothing")

    p = command("demo", cmd_demo, "train, checkpoint asynchronously, crash, resume and verify, on an embedded "
                                  "S3 server (or --uri / AWS_ENDPOINT_URL)")
    p.add_argument("--steps", type=int, default=12, help="training steps before the crash (default 12)")
    p.add_argument("--every", type=int, default=3, help="checkpoint every N steps (default 3)")
    p.add_argument("--size-mib", type=float, default=64.0,
                   help="model + optimizer state size in MiB (default 64)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--uri", default=None, help="checkpoint root to use instead of the embedded server")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cloudckpt`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    from cloudckpt.errors import CloudCheckpointError

    out = _Out(json=args.json, quiet=args.quiet, force_progress=args.progress)
    try:
        return int(args.func(args, out))
    except KeyboardInterrupt:
        print("cloudckpt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        code = exit_code_for(exc)
        message = str(exc) or type(exc).__name__
        if code == EXIT_MISSING and "pip install" not in message:
            extra = "demo" if getattr(args, "command", None) == "demo" else "all"
            message = f"{message} (a package this command needs is not installed: pip install 'cloudckpt[{extra}]')"
        elif code == EXIT_LOCAL_FS and isinstance(exc, OSError) and not isinstance(exc, CloudCheckpointError):
            message = (f"{message} (the local file system refused the operation: check free space, quota, "
                       "permissions and the path)")
        elif code == EXIT_UNEXPECTED and not isinstance(exc, (CLIError, CloudCheckpointError)):
            message = f"unexpected {type(exc).__name__}: {message} (rerun with --debug for the traceback)"
        if args.debug:
            traceback.print_exc()
        print(f"cloudckpt: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": message, "error_type": type(exc).__name__, "exit_code": code}))
        return code


if __name__ == "__main__":  # pragma: no cover - `python -m cloudckpt.cli`
    sys.exit(main())
