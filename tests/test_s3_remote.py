"""The team remote on S3, for real over HTTP: an S3-compatible server (moto) on the loopback
address, one clone of the project that runs the DAG on toy data and pushes, a second clone
that pulls and finds nothing to reproduce, and a read-only key that cannot push.

Needs requirements-test.txt (dvc-s3, moto[server]); `make test` installs it.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.project import attempt, commit, make_project, run

pytestmark = pytest.mark.s3
BUCKET = "odmt-team"

# The whole DAG, as small as it gets: 12 users, 15 items, one ID-only run, one epoch.
TOY = {
    "ingest": {"adapter": "generic", "path": "data/raw/toy", "generic": {"image_column": None}},
    "text_features": {"max_tokens": 8, "pooled_only": True},
    "image_features": {"pooled_only": True, "num_workers": 0},
    "runs": {"variant": ["sasrec_id"], "seed": [1]},
    "train": {"epochs": 1, "batch_size": 8},
    "score": {"k": 10},
    "evaluate": {"ks": [5, 10]},
    "report": {"proposed": "sasrec_id", "showcase_run": "sasrec_id-s1", "showcase_users": 2},
    "recommend": {"runs": ["sasrec_id-s1"], "k": 5},
}


def toy_source(folder: Path) -> None:
    folder.mkdir(parents=True)
    rows = [f"u{u},m{(3 * u + t) % 15 + 1},{1_000_000 + 60 * t}" for u in range(12) for t in range(6)]
    (folder / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    items = [f"m{i},Film {i},A story about the number {i}." for i in range(1, 16)]
    (folder / "items.csv").write_text("item_id,title,description\n" + "\n".join(items) + "\n")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket, a writer and a read-only key (IAM
    policies, enforced once set up)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    setup = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", **setup)
    keys = {}
    for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT
    # From now on every request is checked against the IAM policies above.
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}))
    yield url, keys
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = previous, 0
    server.stop()


def use_remote(repo: Path, url: str, key: tuple[str, str]) -> None:
    """Point `team` at the server, with the key in .dvc/config.local (never in git)."""
    run(["dvc", "remote", "modify", "--local", "team", "endpointurl", url], repo)
    run(["dvc", "remote", "modify", "--local", "team", "access_key_id", key[0]], repo)
    run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", key[1]], repo)


def remote_objects(url: str, key: tuple[str, str]) -> dict[str, str]:
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key[0], aws_secret_access_key=key[1])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {obj["Key"]: obj["ETag"] for page in pages for obj in page.get("Contents", [])}


def outputs(repo: Path) -> dict[str, bytes]:
    """Every file the DAG wrote (cached or committed), by path."""
    return {
        str(path.relative_to(repo)): path.read_bytes()
        for folder in ("data", "models", "exports", "reports", "metrics", "plots", "logs")
        for path in sorted((repo / folder).rglob("*"))
        if path.is_file() and path.name != ".gitignore"
    }


# Credentials of the machine running the tests must not leak into the clones' dvc commands.
NO_AWS = {name: None for name in os.environ if name.startswith("AWS_")} | {
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def test_push_from_one_clone_pull_into_another_and_nothing_to_reproduce(s3, tmp_path):
    url, keys = s3
    one = make_project(tmp_path / "one", TOY)
    toy_source(one / "data/raw/toy")
    run(["dvc", "add", "data/raw/toy"], one, NO_AWS)
    run(["dvc", "remote", "modify", "team", "url", f"s3://{BUCKET}/store"], one)
    run(["dvc", "repro"], one, NO_AWS)
    commit(one, "toy run")
    use_remote(one, url, keys["writer"])
    run(["dvc", "push"], one, NO_AWS)
    pushed = remote_objects(url, keys["writer"])
    assert pushed, "nothing reached the bucket"

    run(["git", "clone", "-q", str(one), str(tmp_path / "two")], tmp_path)
    two = tmp_path / "two"
    assert not (two / ".dvc/config.local").exists()  # the key stayed with the first clone
    use_remote(two, url, keys["reader"])
    run(["dvc", "pull"], two, NO_AWS)
    assert "Running stage" not in run(["dvc", "repro"], two, NO_AWS)
    assert "up to date" in run(["dvc", "status"], two, NO_AWS)
    expected = outputs(one)
    assert {"exports/sasrec_id-s1/user_encoder.onnx", "data/recommendations/sasrec_id-s1.parquet", "reports/charts/at_k.png"} <= set(expected)
    assert outputs(two) == expected

    # A read-only key: push fails with a clear error, and the remote is as it was.
    (two / "data/raw/notes.txt").write_text("not for the remote\n")
    run(["dvc", "add", "data/raw/notes.txt"], two, NO_AWS)
    denied = attempt(["dvc", "push"], two, NO_AWS)
    assert denied.returncode != 0
    # DVC: "failed to transfer '<md5>' - Access Denied: ... PutObject ..." then
    # "failed to push data to the cloud - 1 files failed to upload"
    assert "Access Denied" in denied.stderr and "failed to push data to the cloud" in denied.stderr, denied.stderr
    assert remote_objects(url, keys["writer"]) == pushed
    assert "in sync" in run(["dvc", "status", "--cloud"], one, NO_AWS)  # every pushed file still there
