"""Create the stack's buckets on an S3 endpoint (MinIO), waiting for it to come up.

The compose stack and the Kubernetes manifests run this once before MLflow starts:

    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
    python infra/minio/make_buckets.py --endpoint http://minio:9000 mlflow-artifacts flywheel-lake

Buckets that already exist are left alone, so it is safe to run on every start.  The endpoint
defaults to ``AWS_ENDPOINT_URL_S3``; credentials come only from the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from urllib.parse import urlsplit


def make_buckets(endpoint: str, buckets: list[str], *, wait_s: float = 60.0, region: str = "us-east-1") -> list[str]:
    """Create missing ``buckets``; return the ones created.  Retries until ``wait_s`` while the
    endpoint is not answering yet (a container that starts before MinIO)."""
    import pyarrow.fs as pafs

    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint {endpoint!r} should look like http://minio:9000")
    for name in buckets:
        if not name or "/" in name or name != name.lower():
            raise ValueError(f"bucket name {name!r} is not valid: lower case, no '/'")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not os.environ.get(var):
            raise ValueError(f"{var} is not set: the S3 credentials come from the environment")
    fs = pafs.S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme, region=region,
                           allow_bucket_creation=True, connect_timeout=5, request_timeout=10)
    created = []
    deadline = time.monotonic() + wait_s
    pending = list(buckets)
    while pending:
        name = pending[0]
        try:
            if fs.get_file_info(name).type == pafs.FileType.NotFound:
                fs.create_dir(name)
                created.append(name)
            pending.pop(0)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise OSError(f"cannot create bucket {name!r} at {endpoint} within {wait_s:.0f}s: {exc}") from None
            time.sleep(1.0)
    return created


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Create S3 buckets (idempotent), waiting for the endpoint.")
    p.add_argument("buckets", nargs="+", help="bucket names")
    p.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL_S3", ""),
                   help="S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the endpoint (default 60)")
    args = p.parse_args(argv)
    if not args.endpoint:
        print("make_buckets: give --endpoint http://minio:9000 or set AWS_ENDPOINT_URL_S3", file=sys.stderr)
        return 2
    try:
        created = make_buckets(args.endpoint, args.buckets, wait_s=args.wait)
    except (ValueError, OSError) as exc:
        print(f"make_buckets: {exc}", file=sys.stderr)
        return 1
    existing = [b for b in args.buckets if b not in created]
    print(f"buckets ready at {args.endpoint}: created {created or 'none'}, already there {existing or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
