"""Consume S3/MinIO/Ceph bucket notifications from an SQS queue (or an SQS-compatible one).

Long polling keeps the request rate low; a message is deleted only after
``submit`` accepted its events, so a crash between receive and delete means the
message reappears after the visibility timeout (a duplicate, never a loss).

Unparseable bodies are deleted after being logged with their message id and an
excerpt (``delete_unparseable=True``, the default): they can never succeed, and
not every deployment configures a dead-letter queue, without which such a message
would be received forever.  Set ``delete_unparseable=False`` when the queue has a
redrive policy and you prefer the DLQ to keep them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from worker.errors import BadEventError, EventSubmitError, QueueUnavailableError
from worker.events import ObjectEvent, excerpt, parse_notification
from worker.settings import mask_url
from worker.sources import Submit, run_until_stopped

logger = logging.getLogger(__name__)

_SQS_MAX_BATCH = 10


class SqsSource:
    """Long-poll one SQS queue and hand the parsed events to ``submit``."""

    def __init__(
        self,
        queue_url: str,
        *,
        client: Any,
        submit: Submit,
        wait_time_s: int = 10,
        max_messages: int = 10,
        visibility_timeout_s: int = 120,
        delete_unparseable: bool = True,
    ) -> None:
        if not 1 <= max_messages <= _SQS_MAX_BATCH:
            raise ValueError(f"max_messages must be within 1..{_SQS_MAX_BATCH}, got {max_messages}")
        if not 0 <= wait_time_s <= 20:
            raise ValueError(f"wait_time_s must be within 0..20 (SQS long-poll limit), got {wait_time_s}")
        self.queue_url = queue_url
        self._shown_url = mask_url(queue_url)  # for messages and logs: a presigned URL carries a signature
        self._client = client
        self._submit = submit
        self.wait_time_s = wait_time_s
        self.max_messages = max_messages
        self.visibility_timeout_s = visibility_timeout_s
        self.delete_unparseable = delete_unparseable

    def poll_once(self) -> int:
        """Receive up to ``max_messages``, submit the events of all of them at once, delete the handled ones.

        Returns the number of events submitted. One submit per received page, not per message: the
        ingestor registers and enqueues a page in one transaction and one round trip, which is what keeps
        ingest under a millisecond of CPU per image. If that submit fails, every message of the page stays
        in the queue (registration is idempotent, so the redelivery is harmless), unparseable ones are
        still deleted when ``delete_unparseable``, then ``EventSubmitError`` is raised.
        """
        messages = self._receive()
        done: list[dict[str, str]] = []
        handled: list[dict[str, str]] = []
        page: list[ObjectEvent] = []
        for message in messages:
            body = message.get("Body", "")
            try:
                events = parse_notification(body)
            except BadEventError as exc:
                self._log_unparseable(message.get("MessageId", "?"), body, exc)
                if self.delete_unparseable:
                    done.append(message)
                continue
            page.extend(events)
            handled.append(message)
        failure: Exception | None = None
        if page:
            try:
                self._submit(page)
            except Exception as exc:
                failure = exc
        if failure is None:
            done.extend(handled)
        self._delete(done)
        if failure is not None:
            ids = ", ".join(message.get("MessageId", "?") for message in handled)
            raise EventSubmitError(
                f"submit failed for SQS messages {ids} ({type(failure).__name__}: {failure}); "
                f"they stay in the queue and are redelivered after {self.visibility_timeout_s} s"
            ) from failure
        return len(page)

    def run(self, stop_event: threading.Event) -> None:
        """Poll until ``stop_event`` is set; errors are logged and retried with backoff."""
        run_until_stopped(self.poll_once, stop_event, name=f"sqs {self._shown_url}")

    def _receive(self) -> list[dict[str, Any]]:
        try:
            response = self._client.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=self.max_messages,
                WaitTimeSeconds=self.wait_time_s,
                VisibilityTimeout=self.visibility_timeout_s,
            )
        except (BotoCoreError, ClientError) as exc:
            raise QueueUnavailableError(
                f"cannot receive from {self._shown_url} ({exc}); check the queue URL, endpoint and credentials"
            ) from exc
        return list(response.get("Messages", []))

    def _delete(self, messages: list[dict[str, Any]]) -> None:
        """Delete handled messages in batches of ten; a failed delete only causes a duplicate."""
        for start in range(0, len(messages), _SQS_MAX_BATCH):
            chunk = messages[start : start + _SQS_MAX_BATCH]
            entries = [
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]} for index, message in enumerate(chunk)
            ]
            try:
                response = self._client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            except (BotoCoreError, ClientError) as exc:
                raise QueueUnavailableError(
                    f"cannot delete {len(entries)} handled messages from {self._shown_url} ({exc}); "
                    "they will be redelivered and submitted again (harmless duplicates)"
                ) from exc
            for failed in response.get("Failed", []):
                message = chunk[int(failed["Id"])]
                logger.warning(
                    "could not delete SQS message %s (%s: %s); it will be redelivered as a duplicate",
                    message.get("MessageId"),
                    failed.get("Code"),
                    failed.get("Message"),
                )

    def _log_unparseable(self, message_id: str, body: str, exc: BadEventError) -> None:
        action = "deleting it" if self.delete_unparseable else "leaving it for the dead-letter queue"
        logger.error(
            "SQS message %s is not a bucket notification (%s); %s. Body: %r",
            message_id,
            exc,
            action,
            excerpt(body),
        )
