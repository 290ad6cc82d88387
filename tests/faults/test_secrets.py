"""Row 10 of the fault suite: `waferwatch config` and log lines never show a secret.

Before the fix ``mask_url`` knew a fixed list of query names and only the first URL of a string, so it
leaked ``sslpassword=`` of a database URL, ``X-Amz-Signature``/``X-Amz-Credential`` of a presigned SQS URL
and the second host's password of a multi-host sentinel URL. Now it masks by a rule (a password in the
user-info; any parameter named like a password, token, signature, credential, secret, key or auth in the
query or fragment; in every URL of the string), checked here on a table of URLs and through a real
``waferwatch config`` subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from worker.settings import MASK, mask_url

M = MASK
PRESIGNED_SQS = (
    "https://sqs.eu-west-1.amazonaws.com/123456789012/wafer-events?Action=ReceiveMessage"
    "&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261201%2Feu-west-1%2Fsqs%2Faws4_request"
    "&X-Amz-Date=20261201T220000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN&X-Amz-Signature=5f2d1c0b9a8e7f6d5c4b3a2918a7b6c5d4e3f2a1"
)
PRESIGNED_SQS_MASKED = (
    "https://sqs.eu-west-1.amazonaws.com/123456789012/wafer-events?Action=ReceiveMessage"
    f"&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={M}"
    "&X-Amz-Date=20261201T220000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host"
    f"&X-Amz-Security-Token={M}&X-Amz-Signature={M}"
)

# (url, masked form, secrets that must not survive)
CASES = [
    # user-info passwords, also with unencoded @ / ? # in them
    ("postgresql://u:pw@h/db", f"postgresql://u:{M}@h/db", ["pw"]),
    ("postgresql+psycopg://u:p%40ss@h:5432/db", f"postgresql+psycopg://u:{M}@h:5432/db", ["p%40ss"]),
    ("postgresql://u:p@ss/w#rd?x@h/db", f"postgresql://u:{M}@h/db", ["p@ss/w#rd?x", "ss/w"]),
    ("redis://:s3cret@redis:6379/0", f"redis://:{M}@redis:6379/0", ["s3cret"]),
    ("amqp://guest:guest-pw@rabbit//", f"amqp://guest:{M}@rabbit//", ["guest-pw"]),
    # libpq parameters
    (
        "postgresql+psycopg://app@db:5432/ww?sslmode=verify-full&sslcert=/run/c.crt&sslpassword=KEYPASS",
        f"postgresql+psycopg://app@db:5432/ww?sslmode=verify-full&sslcert=/run/c.crt&sslpassword={M}",
        ["KEYPASS"],
    ),
    (
        "postgresql://h/db?user=u&password=pw&application_name=a%20b",
        f"postgresql://h/db?user=u&password={M}&application_name=a%20b",
        ["pw&"],
    ),
    # multi-host: PostgreSQL host lists, kombu sentinel lists with a password per host
    (
        "postgresql://u:PGPW@h1:5432,h2:5432/db?target_session_attrs=read-write",
        f"postgresql://u:{M}@h1:5432,h2:5432/db?target_session_attrs=read-write",
        ["PGPW"],
    ),
    (
        "sentinel://:SENT1@s1:26379;sentinel://:SENT2@s2:26379;sentinel://s3:26379/0",
        f"sentinel://:{M}@s1:26379;sentinel://:{M}@s2:26379;sentinel://s3:26379/0",
        ["SENT1", "SENT2"],
    ),
    (
        "sentinel://s1:26379;sentinel://:pa;ss@s2:26379",
        f"sentinel://s1:26379;sentinel://:{M}@s2:26379",
        ["pa;ss", "ss@"],
    ),
    # presigned and signed URLs
    (PRESIGNED_SQS, PRESIGNED_SQS_MASKED, ["AKIAIOSFODNN7EXAMPLE", "EXAMPLETOKEN", "5f2d1c0b9a8e"]),
    (
        "https://bucket.s3.amazonaws.com/k.png?AWSAccessKeyId=AKIAOLD&Expires=1767225600&Signature=c2lnbmF0dXJl",
        f"https://bucket.s3.amazonaws.com/k.png?AWSAccessKeyId={M}&Expires=1767225600&Signature={M}",
        ["AKIAOLD", "c2lnbmF0dXJl"],
    ),
    (
        "https://acct.blob.core.windows.net/c?sv=2022-11-02&se=2026-12-31&sp=r&sig=AzUrEsIg%3D",
        f"https://acct.blob.core.windows.net/c?sv=2022-11-02&se=2026-12-31&sp=r&sig={M}",
        ["AzUrEsIg"],
    ),
    (
        "https://hooks.example.com/in?api_key=AK1&client_secret=CS1&Auth=AU1&private-key=PK1",
        f"https://hooks.example.com/in?api_key={M}&client_secret={M}&Auth={M}&private-key={M}",
        ["AK1", "CS1", "AU1", "PK1"],
    ),
    # fragments
    (
        "https://idp.example.com/cb#access_token=FRAGTOK&state=abc",
        f"https://idp.example.com/cb#access_token={M}&state=abc",
        ["FRAGTOK"],
    ),
    ("https://docs.example.com/page#section-2", "https://docs.example.com/page#section-2", []),
    # nothing secret: unchanged byte for byte
    ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require", []),
    ("sqlite:///var/waferwatch.db", "sqlite:///var/waferwatch.db", []),
    ("filesystem://", "filesystem://", []),
    ("not a url", "not a url", []),
]


@pytest.mark.parametrize(("url", "masked", "secrets"), CASES, ids=[case[0][:48] for case in CASES])
def test_mask_url_masks_by_rule(url: str, masked: str, secrets: list[str]) -> None:
    result = mask_url(url)

    assert result == masked
    for secret in secrets:
        assert secret not in result


def test_config_command_prints_no_secret() -> None:
    env = {
        **os.environ,
        "WAFERWATCH_DATABASE_URL": "postgresql://app@db:5432/ww?sslmode=verify-full&sslpassword=KEYPASS",
        "WAFERWATCH_REPORT_DATABASE_URL": "postgresql://reader:READERPW@db1:5432,db2:5432/ww",
        "WAFERWATCH_BROKER_URL": "sentinel://:SENT1@s1:26379;sentinel://:SENT2@s2:26379",
        "WAFERWATCH_SQS_QUEUE_URL": PRESIGNED_SQS,
        "WAFERWATCH_S3_ACCESS_KEY": "AKIAS3",
        "WAFERWATCH_S3_SECRET_KEY": "S3SECRETKEY",
        "WAFERWATCH_WEBHOOK_TOKEN": "WEBHOOKTOKEN",
    }
    command = [sys.executable, "-c", "from worker.cli import main; main()", "config", "--format", "json"]

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    for secret in (
        "KEYPASS",
        "READERPW",
        "SENT1",
        "SENT2",
        "AKIAIOSFODNN7EXAMPLE",
        "EXAMPLETOKEN",
        "5f2d1c0b9a8e",
        "S3SECRETKEY",
        "WEBHOOKTOKEN",
    ):
        assert secret not in result.stdout, secret
    values = json.loads(result.stdout)
    assert values["broker_url"] == f"sentinel://:{M}@s1:26379;sentinel://:{M}@s2:26379"
    assert values["sqs_queue_url"] == PRESIGNED_SQS_MASKED


def test_sqs_source_errors_do_not_carry_the_queue_url_signature(closed_port_url: str) -> None:
    import boto3
    from botocore.config import Config

    from worker.errors import QueueUnavailableError
    from worker.sources.sqs import SqsSource

    queue_url = f"{closed_port_url}/123456789012/wafer-events?X-Amz-Credential=AKIALEAK&X-Amz-Signature=SIGLEAK"
    client = boto3.client(
        "sqs",
        endpoint_url=closed_port_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(connect_timeout=1, retries={"max_attempts": 1}),
    )
    source = SqsSource(queue_url, client=client, submit=lambda events: None, wait_time_s=0)

    with pytest.raises(QueueUnavailableError) as caught:
        source.poll_once()

    assert "wafer-events" in str(caught.value)
    assert "AKIALEAK" not in str(caught.value) and "SIGLEAK" not in str(caught.value)
