"""Storage backends for tests: real servers on 127.0.0.1 (moto for S3, our emulator for GCS) or a temp dir.

A :class:`Backend` gives a fresh bucket per test, the writer/reader options to
reach it, and plain-client helpers (boto3 / google-cloud-storage / shutil) to
copy a checkpoint between the store and a local directory, so interop tests
do not go through cloudckpt itself.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Backend:
    """One storage target prepared for one test."""

    name: str
    root: str                      # e.g. s3://bucket-x  or /tmp/.../store
    options: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None
    bucket: str | None = None

    def uri(self, *parts: str) -> str:
        """URI of a checkpoint (or prefix) under this test's root."""
        if self.name == "local":
            return os.path.join(self.root, *parts)
        return "/".join([self.root, *parts])

    def store(self) -> Any:
        """A cloudckpt ObjectStore for the bucket (for inspecting state)."""
        from cloudckpt.store import open_store

        return open_store(self.root, **self.options)

    def keys(self, prefix_uri: str) -> list[str]:
        """Relative object names under a checkpoint URI (plain client)."""
        from cloudckpt.uri import parse_uri

        u = parse_uri(prefix_uri)
        if self.name == "local":
            out = []
            for d, _, files in os.walk(u.prefix):
                out += [os.path.relpath(os.path.join(d, f), u.prefix) for f in files]
            return sorted(out)
        if self.name == "s3":
            c = self.s3_client()
            pages = c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=u.prefix + "/")
            return sorted(o["Key"][len(u.prefix) + 1:] for p in pages for o in p.get("Contents", []))
        client = self.gcs_client()
        return sorted(b.name[len(u.prefix) + 1:] for b in client.list_blobs(self.bucket, prefix=u.prefix + "/"))

    def pending_uploads(self, prefix_uri: str) -> list[str]:
        """Keys with incomplete multipart uploads under a prefix."""
        from cloudckpt.uri import parse_uri

        u = parse_uri(prefix_uri)
        if self.name == "s3":
            resp = self.s3_client().list_multipart_uploads(Bucket=self.bucket, Prefix=u.prefix)
            return [x["Key"] for x in resp.get("Uploads", [])]
        return [m.key for m in self.store().list_multipart_uploads(u.key(""))]

    def download(self, prefix_uri: str, dest: str) -> None:
        """Copy every object of a checkpoint into ``dest`` with the plain client."""
        from cloudckpt.uri import parse_uri

        u = parse_uri(prefix_uri)
        if self.name == "local":
            shutil.copytree(u.prefix, dest, dirs_exist_ok=True)
            return
        for rel in self.keys(prefix_uri):
            path = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if self.name == "s3":
                self.s3_client().download_file(self.bucket, f"{u.prefix}/{rel}", path)
            else:
                self.gcs_client().bucket(self.bucket).blob(f"{u.prefix}/{rel}").download_to_filename(path)

    def upload(self, src: str, prefix_uri: str) -> None:
        """Copy a local directory's files under a checkpoint URI with the plain client."""
        from cloudckpt.uri import parse_uri

        u = parse_uri(prefix_uri)
        if self.name == "local":
            shutil.copytree(src, u.prefix, dirs_exist_ok=True)
            return
        for d, _, files in os.walk(src):
            for f in files:
                path = os.path.join(d, f)
                key = f"{u.prefix}/{os.path.relpath(path, src)}"
                if self.name == "s3":
                    self.s3_client().upload_file(path, self.bucket, key)
                else:
                    self.gcs_client().bucket(self.bucket).blob(key).upload_from_filename(path)

    def s3_client(self) -> Any:
        from cloudckpt_testing.s3 import s3_client

        assert self.endpoint
        return s3_client(self.endpoint)

    def gcs_client(self) -> Any:
        from cloudckpt_testing.gcs_emulator import gcs_client

        assert self.endpoint
        return gcs_client(self.endpoint)


def new_bucket_name() -> str:
    """A unique, valid bucket name."""
    return f"test-{uuid.uuid4().hex[:20]}"
