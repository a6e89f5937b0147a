"""Pytest fixtures for an S3 object store: an in-process moto server and a fresh bucket per test.

moto rather than the local stack's S3 server because moto honours S3's conditional writes
(``If-None-Match``/``If-Match``), which :mod:`slmops.objectstore` relies on, starts in a fraction
of a second and needs no network beyond 127.0.0.1. Its state lives in this process: tests that
also use moto's ``mock_aws`` decorator reset it, so don't mix the two in one test.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from slmops.objectstore import ObjectStore
from slmops.settings import PlatformSettings

#: moto accepts any credentials; these only have to be non-empty so requests get signed.
TEST_ACCESS_KEY = "slmops-test"
TEST_SECRET_KEY = "slmops-test-secret"  # noqa: S105 - dummy credentials of the moto server
TEST_REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL (``http://127.0.0.1:<port>``) of a moto S3 server shared by the session."""
    # Its request log (werkzeug, one INFO line per S3 call) would crowd out the services' own
    # lines in a failed test's captured log.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()  # port 0 asked for any free port: read the real one
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def object_store(s3_server: str) -> Iterator[ObjectStore]:
    """An :class:`ObjectStore` on ``s3_server`` with its own new bucket, so tests don't mix."""
    store = ObjectStore(
        endpoint_url=s3_server,
        region=TEST_REGION,
        bucket=f"slmops-test-{uuid.uuid4().hex[:16]}",
        access_key_id=TEST_ACCESS_KEY,
        secret_access_key=TEST_SECRET_KEY,
    )
    store.ensure_bucket()
    try:
        yield store
    finally:
        store.close()


def raw_s3_client(settings: PlatformSettings) -> Any:
    """A plain boto3 client on the platform's store, to look behind the ObjectStore's back."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id.get_secret_value(),
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
    )


def open_multipart_uploads(settings: PlatformSettings) -> list[Any]:
    """Multipart uploads begun and neither completed nor aborted (should be none)."""
    listing = raw_s3_client(settings).list_multipart_uploads(Bucket=settings.s3_bucket)
    return list(listing.get("Uploads", []))
