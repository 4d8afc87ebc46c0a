"""Credentials never show in logs (DEBUG, botocore's included), errors, reprs or stored objects.

Each test runs real saves and loads with a sentinel credential, captures every
log record at DEBUG, provokes errors, and then searches all of it, and every
stored byte, for the sentinel.
"""

from __future__ import annotations

import logging
import traceback

import pytest
import torch

import cloudckpt
from cloudckpt.retry import RetryPolicy
from cloudckpt_testing.faultproxy import FaultProxy, FaultRule
from cloudckpt.uri import parse_uri
from tests.conftest import closed_port, make_backend

SECRET = "cloudckpt-SENTINEL-7f0c1e9a"


def _everything(exc: BaseException) -> str:
    """An exception as a user would see it: message, repr, and the whole chained traceback."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


def _stored_bytes(backend, uri: str) -> dict[str, bytes]:
    store = backend.store()
    base = parse_uri(uri).key("")
    return {o.key: store.get(o.key) for o in store.list(base)}


def _errors(uri_of, opts_for, backend_name: str, endpoint: str) -> list[BaseException]:
    """Provoke the usual failures with the sentinel credentials in use.

    ``opts_for(endpoint)`` gives the options that reach ``endpoint`` with those credentials.
    """
    seen: list[BaseException] = []
    quick = RetryPolicy(unreachable_timeout=0.2)
    dead = f"http://127.0.0.1:{closed_port()}"
    cases = [
        ("save", f"{uri_of('')[:5]}no-such-bucket-{abs(hash(SECRET)) % 10**8}/ck", opts_for(endpoint)),
        ("load", uri_of("gone"), opts_for(endpoint)),       # a checkpoint that does not exist
        ("save", uri_of("x"), dict(opts_for(dead), retry_policy=quick)),
    ]
    rules = [FaultRule(None, fault="status", status=403)]
    with FaultProxy(endpoint, rules=rules, api="s3" if backend_name == "s3" else "gcs") as proxy:
        cases.append(("save", uri_of("denied"), opts_for(proxy.url)))   # credentials refused
        for what, uri, o in cases:
            try:
                if what == "load":
                    cloudckpt.load({"a": torch.ones(2)}, uri, no_dist=True, **o)
                else:
                    cloudckpt.save({"a": torch.ones(2)}, uri, no_dist=True, **o)
            except BaseException as exc:  # noqa: BLE001 - collected for inspection
                seen.append(exc)
    assert [type(e).__name__ for e in seen] == ["BucketNotFoundError", "CheckpointNotFoundError",
                                                "EndpointUnreachableError", "AccessDeniedError"], seen
    return seen


@pytest.mark.parametrize("how", ["environment", "options"])
def test_s3_credentials_never_leak(request, tmp_path, monkeypatch, caplog, how):
    backend = make_backend("s3", request, tmp_path)
    opts = dict(backend.options)
    if how == "environment":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET + "-token")
    else:
        opts.update(aws_access_key_id="testing", aws_secret_access_key=SECRET, aws_session_token=SECRET + "-token")
    caplog.set_level(logging.DEBUG)
    uri = backend.uri("ck")
    sd = {"w": torch.randn(300_000), "step": 7, "name": "run"}
    cloudckpt.save(sd, uri, no_dist=True, part_size=5 << 20, **opts)
    out = {"w": torch.empty(300_000), "step": 0, "name": ""}
    cloudckpt.load(out, uri, no_dist=True, **opts)
    assert torch.equal(out["w"], sd["w"])
    writer = cloudckpt.storage_writer(uri, **opts)
    reader = cloudckpt.storage_reader(uri, **opts)
    errors = _errors(backend.uri, lambda endpoint: dict(opts, endpoint_url=endpoint), "s3", backend.endpoint)

    assert "botocore" in caplog.text and "x-amz-security-token" in caplog.text.lower(), \
        "botocore's DEBUG request logs were not captured: the check below would be vacuous"
    assert SECRET not in caplog.text
    for obj in (writer, reader, writer.store, reader.store):
        assert SECRET not in repr(obj) and SECRET not in str(obj)
    for exc in errors:
        assert SECRET not in _everything(exc), type(exc)
    for key, data in _stored_bytes(backend, uri).items():
        assert SECRET.encode() not in data, key


def test_gcs_token_never_leaks(gcs_server, request, tmp_path, caplog):
    from google.cloud import storage
    from google.oauth2.credentials import Credentials

    backend = make_backend("gcs", request, tmp_path)
    sent: list[str] = []

    def client_for(endpoint: str) -> storage.Client:
        c = storage.Client(project="p", credentials=Credentials(token=SECRET),
                           client_options={"api_endpoint": endpoint})
        c._http.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.headers.get("Authorization", "")))
        return c

    client = client_for(gcs_server.endpoint)
    caplog.set_level(logging.DEBUG)
    uri = backend.uri("ck")
    sd = {"w": torch.randn(300_000), "step": 7}
    cloudckpt.save(sd, uri, no_dist=True, client=client)
    out = {"w": torch.empty(300_000), "step": 0}
    cloudckpt.load(out, uri, no_dist=True, client=client)
    assert torch.equal(out["w"], sd["w"])
    assert f"Bearer {SECRET}" in sent, "the sentinel token was not in use: the checks below would be vacuous"
    writer = cloudckpt.storage_writer(uri, client=client)
    reader = cloudckpt.storage_reader(uri, client=client)
    errors = _errors(backend.uri, lambda endpoint: {"client": client_for(endpoint)}, "gcs", gcs_server.endpoint)

    assert caplog.records, "no DEBUG records were captured"
    assert SECRET not in caplog.text
    for obj in (writer, reader, writer.store, reader.store):
        assert SECRET not in repr(obj) and SECRET not in str(obj)
    for exc in errors:
        assert SECRET not in _everything(exc), type(exc)
    for key, data in _stored_bytes(backend, uri).items():
        assert SECRET.encode() not in data, key
