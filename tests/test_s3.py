"""A real S3 endpoint on the loopback interface: moto's server, with IAM checks switched on.

The fixture starts ``ThreadedMotoServer`` on 127.0.0.1 and a free port (how s3fs tests
itself), creates a user with S3 rights and a bucket holding shards and a folder, then makes
the server check every request's credentials. visbatch runs as a user runs it: a
subprocess, credentials and endpoint from the environment (``AWS_*``,
``FSSPEC_S3_ENDPOINT_URL``), decode workers on.
"""

from __future__ import annotations

import json
import logging
import socket
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURE_IMAGES, PHOTOS, assert_one_line_error, invoke_cli, run_cli, write_image

pytestmark = pytest.mark.slow
TINY_CNN = ["--model", "test-tiny-cnn", "--device", "cpu"]
POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    open_count = settings.INITIAL_NO_AUTH_ACTION_COUNT
    # moto's backends are per process: a second module using this fixture (test_engine_ray) starts
    # from empty ones, not from the user and bucket the first one made.
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    try:
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **setup)
        iam.create_user(UserName="visbatch")
        arn = iam.create_policy(PolicyName="s3-all", PolicyDocument=json.dumps(POLICY))["Policy"]["Arn"]
        iam.attach_user_policy(UserName="visbatch", PolicyArn=arn)
        key = iam.create_access_key(UserName="visbatch")["AccessKey"]
        client = boto3.client(
            "s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], **setup
        )
        client.create_bucket(Bucket="pool")
        local = tmp_path_factory.mktemp("s3-local")
        shards = local / "shards"
        shards.mkdir()
        for n in range(2):
            with tarfile.open(shards / f"{n:05d}.tar", "w") as tar:
                for k, name in enumerate(PHOTOS[n * 2 : n * 2 + 2]):
                    tar.add(FIXTURE_IMAGES / name, arcname=f"{n:05d}{k:04d}.jpg")
            client.upload_file(str(shards / f"{n:05d}.tar"), "pool", f"shards/{n:05d}.tar")
        for n in range(3):
            image = write_image(local / "loose" / f"img{n}.png", seed=n)
            client.upload_file(str(image), "pool", f"loose/img{n}.png")
        # From here on every request must carry the user's credentials.
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        env = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
            "VISBATCH_STAGING": str(local / "staging"),
            "VISBATCH_WORKERS": "2",
        }
        yield {"env": env, "client": client, "local": local}
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = open_count
        server.stop()


def _get(s3, key: str, target: Path) -> Path:
    s3["client"].download_file("pool", key, str(target))
    return target


def test_shards_on_s3_give_the_local_rows_and_the_output_lands_whole(s3, tmp_path):
    local = tmp_path / "local.parquet"
    assert invoke_cli("classify", s3["local"] / "shards", *TINY_CNN, "--workers", "0", "-o", local).exit_code == 0
    result = run_cli(
        "classify", "s3://pool/shards/{00000..00001}.tar", *TINY_CNN, "-o", "s3://pool/runs/c.parquet", env=s3["env"]
    )
    assert result.returncode == 0, result.stderr
    assert "s3://pool/runs/c.parquet" in result.stderr  # the summary names the URL, not the staging file
    remote = pq.read_table(_get(s3, "runs/c.parquet", tmp_path / "remote.parquet")).to_pylist()
    mine = pq.read_table(local).to_pylist()
    assert (
        [r["path"] for r in remote]
        == [r["path"] for r in mine]
        == ["00000.tar/000000000", "00000.tar/000000001", "00001.tar/000010000", "00001.tar/000010001"]
    )
    for a, b in zip(remote, mine):
        assert a["top_indices"] == b["top_indices"] and a["content_hash"] == b["content_hash"]
        assert max(abs(x - y) for x, y in zip(a["top_probs"], b["top_probs"])) < 1e-6
    assert not any((s3["local"] / "staging").rglob("*.parquet"))  # nothing left staged
    # the output exists now: replacing it needs --overwrite, and is refused before any work
    again = run_cli("classify", "s3://pool/shards/", *TINY_CNN, "-o", "s3://pool/runs/c.parquet", env=s3["env"])
    assert_one_line_error(again, 2, "exists; pass --overwrite")
    # an output aimed at an input object is refused
    onto = run_cli("classify", "s3://pool/loose/", *TINY_CNN, "-o", "s3://pool/loose/img0.png", env=s3["env"])
    assert_one_line_error(onto, 2, "is an input")


def test_folder_on_s3_and_resume(s3, tmp_path):
    out = tmp_path / "loose.parquet"
    result = run_cli("classify", "s3://pool/loose/", *TINY_CNN, "-o", out, "--json", env=s3["env"])
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["path"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(r["status"] == "ok" for r in rows)
    resumed = run_cli("classify", "s3://pool/loose/", *TINY_CNN, "-o", out, "--resume", "--json", env=s3["env"])
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == 3 and summary["processed"] == 0, summary
    # overlays to a prefix: staged locally, each PNG uploaded once the run is done
    maps = run_cli(
        "saliency",
        "s3://pool/loose/",
        *TINY_CNN,
        "--method",
        "gradient",
        "-o",
        tmp_path / "s.parquet",
        "--overlays",
        "s3://pool/runs/overlays/",
        env=s3["env"],
    )
    assert maps.returncode == 0, maps.stderr
    listed = s3["client"].list_objects_v2(Bucket="pool", Prefix="runs/overlays/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [f"runs/overlays/img{n}.png.png" for n in range(3)]


def test_missing_object_and_wrong_credentials_are_one_line(s3, tmp_path):
    missing = run_cli("classify", "s3://pool/shards/00042.tar", *TINY_CNN, "-o", tmp_path / "m.parquet", env=s3["env"])
    assert_one_line_error(missing, 2, "input not found: s3://pool/shards/00042.tar")
    wrong = {**s3["env"], "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    denied = run_cli("classify", "s3://pool/shards/", *TINY_CNN, "-o", tmp_path / "d.parquet", env=wrong)
    assert_one_line_error(denied, 3, "access denied")
    assert not (tmp_path / "d.parquet").exists()


def _objects(s3) -> dict:
    """Every object of the bucket: key -> (ETag, size)."""
    listed = s3["client"].list_objects_v2(Bucket="pool").get("Contents", [])
    return {o["Key"]: (o["ETag"], o["Size"]) for o in listed}


S3_ALIASES = [
    "s3://pool/{}",
    "s3a://pool/{}",
    "s3n://pool/{}",
    "s3a://POOL/{}",
    "s3://pool//{}",
    "s3a://pool/./x/../{}",
]


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    alias=st.sampled_from(S3_ALIASES),
    aim=st.sampled_from(["loose/img0.png", "loose/", "loose", "shards/00000.tar", "shards/"]),
    role=st.sampled_from(["-o", "--overlays", "--report"]),
    source=st.sampled_from(["s3://pool/loose/", "s3a://pool/loose", "s3://pool/shards/{00000..00001}.tar"]),
)
def test_s3_inputs_survive_every_alias_of_an_output(s3, tmp_path, alias, aim, role, source):
    """The property on object storage: inputs named one way, outputs aimed at them another. (The
    bucket is put back as it was after each example: an output over an object that is not this
    run's input is allowed, and other tests read the bucket.)"""
    client = s3["client"]
    before = _objects(s3)
    saved = {k: client.get_object(Bucket="pool", Key=k)["Body"].read() for k in before}
    target = alias.format(aim)
    out = str(tmp_path / "o.parquet")
    extra: list[str] = []
    if role == "-o":
        out = target
    elif role == "--overlays":
        extra = ["--overlays", target]
    else:
        out = target.rstrip("/").rsplit(".", 1)[0] + ".parquet"
        extra = ["--report"]
    command = ["saliency", "--method", "gradient"] if role == "--overlays" else ["classify"]
    try:
        result = run_cli(*command, source, *TINY_CNN, *extra, "--overwrite", "-o", out, env=s3["env"])
        assert result.returncode in (0, 2), result.stderr
        after = _objects(s3)
        prefix = "loose/" if "loose" in source else "shards/0000"
        inputs = [k for k in before if k.startswith(prefix)]
        assert {k: after.get(k) for k in inputs} == {k: before[k] for k in inputs}, (target, role, result.stderr)
        assert not [k for k in after if k.startswith(prefix) and k not in before], (target, role, result.stderr)
    finally:
        for key in set(_objects(s3)) - set(before):
            client.delete_object(Bucket="pool", Key=key)
        for key, data in saved.items():
            if _objects(s3).get(key) != before[key]:
                client.put_object(Bucket="pool", Key=key, Body=data)


def test_merge_and_report_write_to_urls(s3, tmp_path):
    """Item 15: merge -o URL and report -o URL are staged and uploaded whole (they wrote a local
    folder named 's3:' before)."""
    pytest.importorskip("jinja2")
    parts = []
    for i in range(2):
        part = tmp_path / f"p{i}.parquet"
        assert invoke_cli("classify", s3["local"] / "loose", *TINY_CNN, "--shard", f"{i}/2", "-o", part).exit_code == 0
        parts.append(part)
    merged = run_cli("merge", *parts, "-o", "s3://pool/runs/merged.parquet", env=s3["env"], cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert pq.read_table(_get(s3, "runs/merged.parquet", tmp_path / "m.parquet")).num_rows == 3
    report = run_cli("report", parts[0], "-o", "s3://pool/runs/r.html", env=s3["env"], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert b"<html" in _get(s3, "runs/r.html", tmp_path / "r.html").read_bytes()
    assert not (tmp_path / "s3:").exists()
    again = run_cli("merge", *parts, "-o", "s3://pool/runs/merged.parquet", env=s3["env"], cwd=tmp_path)
    assert_one_line_error(again, 2, "exists; pass --overwrite")


def test_s3a_names_the_same_objects_as_s3(s3, tmp_path):
    """Item 3: an output spelled s3a:// over an input read as s3:// (it overwrote the object)."""
    before = _objects(s3)
    onto = run_cli(
        "classify", "s3://pool/loose/", *TINY_CNN, "-o", "s3a://pool/loose/img0.png", "--overwrite", env=s3["env"]
    )
    assert_one_line_error(onto, 2, "is an input")
    into = run_cli(
        "saliency", "s3://pool/loose/", *TINY_CNN, "--method", "gradient", "--overlays", "s3a://pool/loose/",
        "-o", tmp_path / "s.parquet", env=s3["env"],
    )  # fmt: skip
    assert_one_line_error(into, 2, "input folder")
    assert _objects(s3) == before and not (tmp_path / "s.parquet").exists()


def test_report_reads_a_url_output_and_report_lands_beside_a_url_output(s3, tmp_path):
    """Item 11: `visbatch report s3://.../scores.parquet` said "no file"; `--report` beside a URL -o."""
    pytest.importorskip("jinja2")
    result = run_cli(
        "classify", "s3://pool/shards/{00000..00001}.tar", *TINY_CNN, "-o", "s3://pool/runs/rep.parquet", "--report",
        env=s3["env"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page = _get(s3, "runs/rep.html", tmp_path / "beside.html").read_text()
    assert "<html" in page and page.count("data:image/jpeg") >= 4  # thumbnails read from the shards on S3
    report = run_cli("report", "s3://pool/runs/rep.parquet", "-o", tmp_path / "r.html", env=s3["env"], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "<html" in (tmp_path / "r.html").read_text()
    missing = run_cli("report", "s3://pool/runs/none.parquet", "-o", tmp_path / "n.html", env=s3["env"])
    assert_one_line_error(missing, 2, "no file s3://pool/runs/none.parquet")


def test_a_dead_endpoint_is_one_line_on_every_kind_of_input(s3, tmp_path):
    """Item 10: a brace range of shards on a dead endpoint was an internal error."""
    dead = {**s3["env"], "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    for source in ("s3://pool/shards/{00000..00001}.tar", "s3://pool/shards/"):
        result = run_cli("classify", source, *TINY_CNN, "-o", tmp_path / "o.parquet", env=dead)
        assert_one_line_error(result, 3, "cannot reach s3://pool/shards/")
        assert not (tmp_path / "o.parquet").exists()
