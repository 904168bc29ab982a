"""An S3-compatible server for the durable embedded broker in the tests: moto's, in a
process of its own, so that the broker can be stopped and started while its storage
stays (as a real S3 or MinIO would). moto keeps objects in memory: durable across
broker restarts, not across its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.embedded import free_port, stop_process, wait_for_port


class S3Server:
    def __init__(self, log_path: Path | None = None):
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """This process's environment plus what Tansu's object store reads."""
        return os.environ | {"AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true",
                             "AWS_ACCESS_KEY_ID": "promptrec", "AWS_SECRET_ACCESS_KEY": "promptrec",
                             "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> S3Server:
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out, stderr=subprocess.STDOUT)
        if not wait_for_port("127.0.0.1", self.port, 30):
            self.stop()
            raise RuntimeError(f"moto's S3 server did not listen on {self.endpoint}")
        return self

    def create_bucket(self, name: str) -> str:
        """-> the broker's storage URL for a new bucket `name`."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="promptrec",
                     aws_secret_access_key="promptrec").create_bucket(Bucket=name)
        return f"s3://{name}/"

    def stop(self) -> None:
        stop_process(self.process, timeout_s=10)
        self.process = None
