"""Credentials that rotate during a long job (IRSA, ECS/EKS/SageMaker container credentials, SSO).

A local container-credentials endpoint (``AWS_CONTAINER_CREDENTIALS_FULL_URI``)
issues keys that expire after a few seconds, and the policy proxy in front of
moto refuses any request signed with an expired or unknown key (400
ExpiredToken, as S3 does). Two async saves spaced past an expiry must both
succeed through the thread executor, the process executor and the manager:
nothing may snapshot credentials (a pickled writer, a cached client in the
checkpoint process) and use them after they expire.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import boto3
import pytest
import torch

import cloudckpt
from cloudckpt_testing.policy_proxy import BucketPolicy, ContainerCredentialsServer, PolicyProxy
from tests.backends import new_bucket_name

TTL = 20.0  # seconds each issued key lives; the two rounds of saves are spaced past it


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((50_000,), v), "b": torch.arange(10.0) + v}


def test_rotating_container_credentials_across_async_saves(moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = new_bucket_name()
    boto3.client("s3", endpoint_url=moto_server.endpoint_url).create_bucket(Bucket=bucket)
    with ContainerCredentialsServer(ttl=TTL) as creds, PolicyProxy(
            moto_server.endpoint_url, BucketPolicy(credentials_valid=None)) as proxy:
        proxy.policy.credentials_valid = creds.valid
        # Only the container provider may answer: no static keys, no profile.
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", creds.url)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        opts = {"endpoint_url": proxy.url}
        root = f"s3://{bucket}"

        thread_ex = cloudckpt.ThreadCheckpointExecutor()
        process_ex = cloudckpt.ProcessCheckpointExecutor()
        mgr = cloudckpt.CheckpointManager(f"{root}/managed", keep_last=1, executor=process_ex, **opts)
        try:
            def save_round(v: float) -> None:
                futures = [
                    cloudckpt.async_save(_state(v), checkpoint_id=f"{root}/thread-{v:g}", executor=thread_ex,
                                         no_dist=True, **opts).upload_completion,
                    cloudckpt.async_save(_state(v), checkpoint_id=f"{root}/process-{v:g}", executor=process_ex,
                                         no_dist=True, **opts).upload_completion,
                ]
                for f in futures:
                    f.result(timeout=300)
                mgr.async_save(_state(v), int(v)).result(timeout=300)

            save_round(1.0)
            first_keys = set(creds.issued())
            # Every key used so far has expired before the second round starts.
            time.sleep(max(0.0, max(e for _, e in creds.issued().values()) - time.time()) + 1.0)
            assert not any(creds.valid(k, t) for k, (t, _) in creds.issued().items())
            save_round(2.0)
        finally:
            mgr.close()
            thread_ex.close()
            process_ex.close()

        reqs = proxy.requests
        refused = [(r.op, r.denied) for r in reqs if r.denied]
        assert not refused, refused
        second_round_keys = {r.access_key_id for r in reqs} - first_keys - {None}
        assert second_round_keys, "the second round reused the first round's (expired) keys"
        for v in (1.0, 2.0):
            for kind in ("thread", "process"):
                out = {"w": torch.zeros(50_000), "b": torch.zeros(10)}
                cloudckpt.load(out, f"{root}/{kind}-{v:g}", no_dist=True, **opts)
                assert torch.equal(out["w"], _state(v)["w"]), (kind, v)
        with cloudckpt.CheckpointManager(f"{root}/managed", **opts) as check:
            assert check.steps() == [2]
        # The proxy does refuse an expired key: a client that kept one would have failed.
        from cloudckpt import crc
        from cloudckpt.errors import CloudCheckpointError
        from cloudckpt.store.s3 import S3Store

        stale_key, (stale_token, _) = next(iter(creds.issued().items()))
        stale = S3Store(bucket, endpoint_url=proxy.url, aws_access_key_id=stale_key, aws_secret_access_key="x",
                        aws_session_token=stale_token)
        with pytest.raises(CloudCheckpointError, match="ExpiredToken"):
            stale.put("stale", [b"x"], crc32c=crc.crc32c(b"x"))


def test_pickled_writer_holds_no_credentials(moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the process executor sends to its child: options, never keys from the credential chain."""
    from cloudckpt.writer import writer_for

    bucket = new_bucket_name()
    boto3.client("s3", endpoint_url=moto_server.endpoint_url).create_bucket(Bucket=bucket)
    with ContainerCredentialsServer(ttl=60) as creds:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", creds.url)
        writer = writer_for(f"s3://{bucket}/p", endpoint_url=moto_server.endpoint_url)
        writer.store.check_bucket()  # the client has fetched credentials
        issued = creds.issued()
        assert issued, "the store did not fetch container credentials"
        blob = pickle.dumps(writer)
        for key, (token, _) in issued.items():
            assert key.encode() not in blob and token.encode() not in blob
        assert b"secret-" not in blob
