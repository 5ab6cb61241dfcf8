"""The S3 server fixtures (`s3`, `s3_endpoint`) live in tests/conftest.py, where the end-to-end tests
find them too; the helpers stay importable from here."""

from tests.conftest import REGION, Bucket, free_port, moto_server, use_endpoint  # noqa: F401
