"""Parser tests on real-shaped AWS, SNS-wrapped, MinIO (webhook and Redis access) and Ceph payloads."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.errors import BadEventError, PermanentError
from worker.events import DEFAULT_IMAGE_SUFFIXES, ObjectEvent, filter_events, parse_notification


def aws_record(key: str, *, event_name: str = "ObjectCreated:Put", etag: str = "abc123") -> dict[str, Any]:
    """An S3 record as AWS documents it (event structure version 2.1)."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2024-05-02T08:15:30.123Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "10.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "new-images",
            "bucket": {
                "name": "fab-images",
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": "arn:aws:s3:::fab-images",
            },
            "object": {
                "key": key,
                "size": 1024,
                "eTag": etag,
                "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
                "sequencer": "0055AED6DCD90281E5",
            },
        },
    }


def minio_record(key: str, *, event_name: str = "s3:ObjectCreated:Put") -> dict[str, Any]:
    """A record as MinIO emits it: ``s3:``-prefixed event name, extra ``source`` block."""
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": "2024-05-02T08:15:30.123Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "minioadmin"},
        "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "172.18.0.1"},
        "responseElements": {
            "x-amz-request-id": "17CB9F1D4F0B5B5E",
            "x-minio-origin-endpoint": "http://minio:9000",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {
                "name": "wafers",
                "ownerIdentity": {"principalId": "minioadmin"},
                "arn": "arn:aws:s3:::wafers",
            },
            "object": {
                "key": key,
                "size": 2048,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "contentType": "image/png",
                "userMetadata": {"content-type": "image/png"},
                "sequencer": "17CB9F1D4F3C1A2B",
            },
        },
        "source": {"host": "172.18.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"},
    }


def test_aws_record_decodes_key_and_normalises_fields() -> None:
    body = json.dumps({"Records": [aws_record("lot+7/wafer+%2B1%25/die%C3%A9+01.png", etag='"abc123"')]})

    (event,) = parse_notification(body)

    assert event == ObjectEvent(
        bucket="fab-images",
        key="lot 7/wafer +1%/dieé 01.png",
        etag="abc123",
        version_id="096fKKXTRTtl3on89fVO.nfljtsv6qko",
        size=1024,
        event_name="ObjectCreated:Put",
        event_time=datetime(2024, 5, 2, 8, 15, 30, 123000, tzinfo=UTC),
    )


def test_bytes_and_dict_bodies_parse_like_strings() -> None:
    payload = {"Records": [aws_record("a.png")]}

    assert parse_notification(json.dumps(payload).encode()) == parse_notification(payload)


def test_test_event_is_skipped() -> None:
    body = json.dumps(
        {
            "Service": "Amazon S3",
            "Event": "s3:TestEvent",
            "Time": "2024-05-02T08:00:00.000Z",
            "Bucket": "fab-images",
            "RequestId": "5582815E1AEA5ADF",
            "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
        }
    )

    assert parse_notification(body) == []


def test_only_object_created_events_are_kept() -> None:
    body = json.dumps(
        {
            "Records": [
                aws_record("keep.png"),
                aws_record("gone.png", event_name="ObjectRemoved:Delete"),
                aws_record("tagged.png", event_name="ObjectTagging:Put"),
                aws_record("copy.png", event_name="ObjectCreated:CompleteMultipartUpload"),
            ]
        }
    )

    assert [event.key for event in parse_notification(body)] == ["keep.png", "copy.png"]


def test_sns_wrapped_message_is_unwrapped() -> None:
    inner = json.dumps({"Records": [aws_record("sns/wafer+1.png")]})
    body = json.dumps(
        {
            "Type": "Notification",
            "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:fab-images",
            "Subject": "Amazon S3 Notification",
            "Message": inner,
            "Timestamp": "2024-05-02T08:15:31.000Z",
            "SignatureVersion": "1",
        }
    )

    assert [event.key for event in parse_notification(body)] == ["sns/wafer 1.png"]


def test_sns_wrapped_test_event_and_subscription_confirmation_yield_nothing() -> None:
    test_event = json.dumps({"Event": "s3:TestEvent", "Bucket": "fab-images"})
    wrapped = {"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": test_event}
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "TopicArn": "arn:aws:sns:us-east-1:1:t",
        "Message": "You have chosen to subscribe",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
    }

    assert parse_notification(json.dumps(wrapped)) == []
    assert parse_notification(json.dumps(confirmation)) == []


def test_minio_webhook_payload() -> None:
    body = json.dumps(
        {
            "EventName": "s3:ObjectCreated:Put",
            "Key": "wafers/line 2/img 7.png",
            "Records": [minio_record("line+2/img+7.png")],
        }
    )

    (event,) = parse_notification(body)

    assert (event.bucket, event.key, event.event_name) == ("wafers", "line 2/img 7.png", "ObjectCreated:Put")
    assert event.version_id is None
    assert event.size == 2048


def test_minio_redis_access_format_element() -> None:
    element = json.dumps(
        [
            {
                "Event": [
                    minio_record("a%2Bb.png"),
                    minio_record("gone.png", event_name="s3:ObjectRemoved:Delete"),
                ],
                "EventTime": "2024-05-02T08:15:30.123Z",
            }
        ]
    )

    assert [event.key for event in parse_notification(element)] == ["a+b.png"]


def test_ceph_record_with_string_size_and_empty_version() -> None:
    record = {
        "eventVersion": "2.1",
        "eventSource": "ceph:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2019-11-22T13:47:35.124724Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "tester"},
        "requestParameters": {"sourceIPAddress": ""},
        "responseElements": {
            "x-amz-request-id": "503a4c37.5330.903595",
            "x-amz-id-2": "14d2-zone1-zonegroup1",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "mynotif1",
            "bucket": {
                "name": "mybucket1",
                "ownerIdentity": {"principalId": "tester"},
                "arn": "arn:aws:s3:us-east-1::mybucket1",
                "id": "503a4c37-85eb-47cd-8681-2817e80b4281.5332.38",
            },
            "object": {
                "key": "myimage1.jpg",
                "size": "1024",
                "eTag": "37b51d194a7513e45b56f6524f2d51f2",
                "versionId": "",
                "sequencer": "F7E6D75DC742D108",
                "metadata": [],
                "tags": [],
            },
        },
        "eventId": "1575035255.0000000.0000000",
        "opaqueData": "me@example.com",
    }

    (event,) = parse_notification({"Records": [record]})

    assert (event.bucket, event.key, event.size, event.version_id) == (
        "mybucket1",
        "myimage1.jpg",
        1024,
        None,
    )
    assert event.event_time == datetime(2019, 11, 22, 13, 47, 35, 124724, tzinfo=UTC)


def test_duplicates_within_one_message_are_dropped() -> None:
    record = aws_record("dup.png")
    other_version = aws_record("dup.png", etag="other")

    events = parse_notification({"Records": [record, record, other_version]})

    assert [(event.key, event.etag) for event in events] == [("dup.png", "abc123"), ("dup.png", "other")]


@pytest.mark.parametrize(
    "body",
    ['{"Records": [', b"\xff\xfe not json", "42", '{"hello": "world"}', '{"Records": "nope"}'],
)
def test_malformed_bodies_raise_bad_event_error_with_excerpt(body: str | bytes) -> None:
    with pytest.raises(BadEventError) as caught:
        parse_notification(body)

    assert isinstance(caught.value, PermanentError)
    assert "body starts with" in str(caught.value)


def test_created_record_without_key_is_a_bad_event() -> None:
    record = aws_record("x.png")
    del record["s3"]["object"]["key"]

    with pytest.raises(BadEventError, match=r"s3\.object\.key"):
        parse_notification({"Records": [record]})


def test_excerpt_is_short() -> None:
    with pytest.raises(BadEventError) as caught:
        parse_notification("{" + "x" * 10_000)

    assert len(str(caught.value)) < 500


def _event(key: str) -> ObjectEvent:
    return ObjectEvent("b", key, "e", None, 1, "ObjectCreated:Put", None)


def test_filter_events_by_prefix_and_case_insensitive_suffix() -> None:
    events = [_event(key) for key in ("in/a.PNG", "in/b.txt", "other/c.png", "in/d.TIFF", "in2/e.jpg")]

    kept = filter_events(events, prefixes=["in/"], suffixes=None)

    assert [event.key for event in kept] == ["in/a.PNG", "in/d.TIFF"]


def test_filter_events_empty_filters_accept_everything() -> None:
    events = [_event("x/readme.txt"), _event("y.png")]

    assert filter_events(events, prefixes=[], suffixes=[]) == events
    assert [e.key for e in filter_events(events, prefixes=[])] == ["y.png"]
    assert ".bmp" in DEFAULT_IMAGE_SUFFIXES
