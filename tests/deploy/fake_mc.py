#!/usr/bin/env python3
"""A stand-in for MinIO's ``mc`` that keeps MinIO's rules for bucket notifications, for minio-init's test.

Only what minio-init calls: ``alias set``, ``mb``, ``pipe``, ``event add`` and ``event ls``/``event list``.
State (buckets, objects, rules) lives in the JSON file ``$FAKE_MC_STATE``. The notification targets that
exist are the ARNs in ``$FAKE_MINIO_ARNS`` (space-separated), which the test derives from the minio
service's ``MINIO_NOTIFY_WEBHOOK_ENABLE_<ID>`` variables the way the MinIO server does: the id exactly as
written, no case change. As in MinIO, ``event add`` with an unknown ARN fails ("A specified destination
ARN does not exist"), adding an existing rule fails unless ``--ignore-existing``, and ``event ls`` prints
one line per rule in mc's own format (``cmd/event-list.go``: ``ARN   EVENTS   Filter: prefix="…"suffix="…"``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _load() -> dict:
    path = Path(os.environ["FAKE_MC_STATE"])
    return json.loads(path.read_text()) if path.exists() else {"buckets": {}, "aliases": {}}


def _save(state: dict) -> None:
    Path(os.environ["FAKE_MC_STATE"]).write_text(json.dumps(state, indent=1, sort_keys=True))


def _bucket(state: dict, target: str) -> tuple[str, str]:
    alias, _, rest = target.partition("/")
    if alias not in state["aliases"]:
        sys.exit(f"mc: <ERROR> Unable to find alias {alias!r}.")
    bucket, _, key = rest.partition("/")
    return bucket, key


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1] if name in args else ""


def _positional(args: list[str]) -> list[str]:
    """The arguments that are neither flags nor the values of ``--event``/``--prefix``/``--suffix``."""
    words, index = [], 0
    while index < len(args):
        if args[index] in ("--event", "--prefix", "--suffix"):
            index += 2
        elif args[index].startswith("--"):
            index += 1
        else:
            words.append(args[index])
            index += 1
    return words


def main(argv: list[str]) -> int:
    state = _load()
    if argv[:2] == ["alias", "set"]:
        state["aliases"][argv[2]] = argv[3]
    elif argv[:1] == ["mb"]:
        bucket, _ = _bucket(state, argv[-1])
        if bucket in state["buckets"] and "--ignore-existing" not in argv:
            sys.exit("mc: <ERROR> Unable to make bucket: Your previous request to create the named bucket succeeded.")
        state["buckets"].setdefault(bucket, {"objects": [], "rules": []})
    elif argv[:1] == ["pipe"]:
        bucket, key = _bucket(state, argv[-1])
        sys.stdin.read()
        state["buckets"][bucket]["objects"] = sorted({*state["buckets"][bucket]["objects"], key})
    elif argv[:2] == ["event", "add"]:
        target, arn = _positional(argv[2:])[:2]
        bucket, _ = _bucket(state, target)
        if arn not in os.environ.get("FAKE_MINIO_ARNS", "").split():
            sys.exit(
                "mc: <ERROR> Unable to enable notification on the specified bucket. A specified destination ARN "
                "does not exist or is not well-formed. Verify the destination ARN."
            )
        rule = {"arn": arn, "events": _option(argv, "--event"), "prefix": _option(argv, "--prefix"),
                "suffix": _option(argv, "--suffix")}  # fmt: skip
        rules = state["buckets"][bucket]["rules"]
        if rule in rules:
            if "--ignore-existing" not in argv:
                sys.exit("mc: <ERROR> Unable to enable notification on the specified bucket. An object key name "
                         "filtering rule defined with overlapping prefixes, overlapping suffixes, or overlapping "
                         "combinations of prefixes and suffixes for the same event types.")  # fmt: skip
        else:
            rules.append(rule)
        print(f"Successfully added {arn}")
    elif argv[:2] in (["event", "ls"], ["event", "list"]):
        bucket, _ = _bucket(state, argv[2])
        arn = argv[3] if len(argv) > 3 else ""
        for rule in state["buckets"][bucket]["rules"]:
            if arn and rule["arn"] != arn:
                continue
            events = ",".join({"put": "s3:ObjectCreated:*"}.get(e, e) for e in rule["events"].split(","))
            line = f"{rule['arn']}   {events}   Filter: "
            line += f'prefix="{rule["prefix"]}"' if rule["prefix"] else ""
            line += f'suffix="{rule["suffix"]}"' if rule["suffix"] else ""
            print(line)
    else:
        sys.exit(f"fake mc: unsupported command {argv!r}")
    _save(state)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
