"""Fixtures shared by the driver's tests."""

from __future__ import annotations

import pytest

from tests.e2e.cluster_procs import S3_TEST_KEYS, S3Server, environment


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for one module's plain-function Tune runs (module scope: a
    module that starts its own Ray finds none running)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_root(request, tmp_path_factory):
    """An S3 prefix on a moto server started for this module (credentials in the env), in
    a bucket named after the module: storage keeps one filesystem per bucket, and another
    module's (its server gone) must not be taken for this one's."""
    import boto3

    bucket = "tf-" + request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")
    server = S3Server()
    server.start(str(tmp_path_factory.mktemp("s3") / "s3.log"))
    try:
        with environment(**S3_TEST_KEYS, AWS_ENDPOINT_URL=server.endpoint):
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield f"s3://{bucket}/root"
    finally:
        server.stop()
