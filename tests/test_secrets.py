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


# -- endpoint passwords and echoed canonical requests (issue 12 item 6) ----------------------------------

PASSWORD = "pw-SENTINEL-3b9d51"


def _with_password(endpoint: str) -> str:
    scheme, rest = endpoint.split("://", 1)
    return f"{scheme}://cloudckpt-user:{PASSWORD}@{rest}"


class _EchoingS3:
    """A real HTTP server on 127.0.0.1 that answers like S3 does to a bad signature: 403
    SignatureDoesNotMatch echoing the canonical request (as text and as hex bytes), session token included."""

    def __enter__(self) -> "_EchoingS3":
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                canonical = "\n".join([self.command, self.path.split("?")[0], ""] +
                                      [f"{k.lower()}:{v}" for k, v in self.headers.items()])
                body = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SignatureDoesNotMatch</Code>"
                        "<Message>The request signature we calculated does not match the signature you provided."
                        f"</Message><CanonicalRequest>{canonical}</CanonicalRequest><CanonicalRequestBytes>"
                        f"{' '.join(f'{b:02x}' for b in canonical.encode())}</CanonicalRequestBytes>"
                        "<RequestId>1</RequestId></Error>").encode()
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _reply

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_s3_session_token_echoed_on_signature_mismatch_is_redacted_in_debug_logs(moto_server, caplog):
    caplog.set_level(logging.DEBUG)
    with _EchoingS3() as server:
        with pytest.raises(cloudckpt.CloudCheckpointError) as info:
            cloudckpt.save({"a": torch.ones(2)}, "s3://echo-bucket/ck", no_dist=True, endpoint_url=server.endpoint,
                           aws_access_key_id="testing", aws_secret_access_key=SECRET,
                           aws_session_token=SECRET + "-token")
    parsers = [r for r in caplog.records if r.name == "botocore.parsers"]
    assert any("SignatureDoesNotMatch" in r.getMessage() for r in parsers), \
        "botocore.parsers did not log the echoed reply: the check below would be vacuous"
    assert SECRET not in caplog.text
    assert SECRET.encode().hex() not in caplog.text.replace(" ", "")   # nor as the echoed hex bytes
    assert SECRET not in _everything(info.value)


def test_s3_endpoint_password_never_shows(request, tmp_path, caplog, capsys):
    from cloudckpt import cli

    backend = make_backend("s3", request, tmp_path)
    caplog.set_level(logging.DEBUG)
    uri = backend.uri("ck")
    opts = dict(backend.options, endpoint_url=_with_password(backend.endpoint))
    cloudckpt.save({"w": torch.randn(1000)}, uri, no_dist=True, **opts)
    writer, reader = cloudckpt.storage_writer(uri, **opts), cloudckpt.storage_reader(uri, **opts)
    dead = _with_password(f"http://127.0.0.1:{closed_port()}")
    seen = []
    for call in (lambda: cloudckpt.save({"a": torch.ones(2)}, uri + "-dead", no_dist=True, endpoint_url=dead,
                                        retry_policy=RetryPolicy(unreachable_timeout=0.2)),
                 lambda: cloudckpt.load({"w": torch.empty(1000)}, backend.uri("missing"), no_dist=True, **opts)):
        with pytest.raises(BaseException) as info:
            call()
        seen.append(info.value)
    assert [type(e).__name__ for e in seen] == ["EndpointUnreachableError", "CheckpointNotFoundError"], seen
    assert "***@127.0.0.1" in str(seen[0])                      # the endpoint is shown, its password is not
    rc = cli.main(["--json", "--endpoint-url", dead, "ls", uri])
    out = capsys.readouterr()
    assert rc != 0 and out.out.strip(), out
    assert "***@127.0.0.1" in out.out, out                     # the endpoint is in the JSON error, masked
    assert PASSWORD not in out.out + out.err
    assert any("127.0.0.1" in r.getMessage() for r in caplog.records), "no request logs captured: vacuous check"
    assert PASSWORD not in caplog.text
    for obj in (writer, reader, writer.store, reader.store):
        assert PASSWORD not in repr(obj) and PASSWORD not in str(obj)
    for exc in seen:
        assert PASSWORD not in _everything(exc), type(exc)


def test_gcs_endpoint_password_never_shows(gcs_server, request, tmp_path, caplog, capsys):
    from cloudckpt import cli

    backend = make_backend("gcs", request, tmp_path)
    caplog.set_level(logging.DEBUG)
    opts = {"endpoint_url": _with_password(gcs_server.endpoint)}
    uri = backend.uri("ck")
    writer, reader = cloudckpt.storage_writer(uri, **opts), cloudckpt.storage_reader(uri, **opts)
    dead = _with_password(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(BaseException) as info:
        cloudckpt.save({"a": torch.ones(2)}, uri, no_dist=True, endpoint_url=dead,
                       retry_policy=RetryPolicy(unreachable_timeout=0.2))
    assert type(info.value).__name__ == "EndpointUnreachableError", info.value
    assert "***@127.0.0.1" in str(info.value)
    rc = cli.main(["--json", "--endpoint-url", dead, "ls", uri])
    out = capsys.readouterr()
    assert rc != 0 and "***@127.0.0.1" in out.out, out
    assert PASSWORD not in out.out + out.err
    assert any("127.0.0.1" in r.getMessage() for r in caplog.records), "no request logs captured: vacuous check"
    assert PASSWORD not in caplog.text
    for obj in (writer, reader, writer.store, reader.store):
        assert PASSWORD not in repr(obj) and PASSWORD not in str(obj)
    assert PASSWORD not in _everything(info.value)


@pytest.mark.parametrize("text, secret", [
    ("http://u:p4ss@host:9/x", "p4ss"),
    ("Could not connect to the endpoint URL: \"https://me:s3cr3t@10.0.0.1/b?list-type=2\"", "s3cr3t"),
    ("{'x-amz-security-token': b'tok123', 'Authorization': b'AWS4'}", "tok123"),
    ("X-Amz-Security-Token=tok456&X-Amz-Signature=sig789", "tok456"),
    ("<CanonicalRequestBytes>74 6f 6b</CanonicalRequestBytes>", "74 6f 6b"),
])
def test_redact_text_masks_passwords_tokens_and_echoed_requests(text, secret):
    from cloudckpt.uri import redact_text, redact_url

    assert secret not in redact_text(text)
    assert redact_url("http://a:b@h:1/p") == "http://***@h:1/p" and redact_url("http://h:1") == "http://h:1"
    assert redact_url(None) is None
