"""CPU per S3 GET of an image, boto3 against obstore (the worker's fast path), side by side.

Prints (not a test) the median CPU ms per GET over interleaved rounds, for the worker's own ``S3Store.get``
with and without its obstore reader (``fast_reads``), on the Dacon PNGs (about 550 kB each):

* the process's CPU (``time.process_time``: every thread, obstore's I/O thread included), which is what a
  worker pays, and the calling thread's alone (what the worker's ``fetch`` stage reports);
* the ratio boto3 / obstore.

The moto server runs in its own process on the first core and this process on the second (where the
machine has two), so the server's work is not counted. Usage:
``python bench/bench_fetch.py [--images 100] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dacon_train
from tests.s3_server import DUMMY_AWS_ENV, free_port
from worker.storage import ObjectStore, make_store


def _start_moto(port: int, core: int | None) -> subprocess.Popen[bytes]:
    moto = Path(sys.executable).with_name("moto_server")
    command = [str(moto), "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if core is not None:
        os.sched_setaffinity(server.pid, {core})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the moto server did not start in 30 s")


def _per_get(store: ObjectStore, keys: list[tuple[str, str]]) -> tuple[float, float]:
    """Process and calling-thread CPU ms per GET of one pass over ``keys`` (key, etag)."""
    process, thread = time.process_time(), time.thread_time()
    for key, etag in keys:
        store.get(key, max_bytes=10 * 2**20, if_match=etag)
    count = len(keys)
    return (time.process_time() - process) / count * 1000, (time.thread_time() - thread) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.update(DUMMY_AWS_ENV)
    cores = sorted(os.sched_getaffinity(0))
    server_core, own_core = (cores[0], cores[1]) if len(cores) > 1 else (None, None)
    port = free_port()
    server = _start_moto(port, server_core)
    try:
        if own_core is not None:
            os.sched_setaffinity(0, {own_core})
        endpoint = f"http://127.0.0.1:{port}"
        stores = {
            "boto3": make_store("s3", endpoint_url=endpoint, bucket="fetch-bench", fast_reads=False),
            "obstore": make_store("s3", endpoint_url=endpoint, bucket="fetch-bench", fast_reads=True),
        }
        stores["boto3"].ensure_bucket()
        refs = sorted(dacon_train(), key=lambda ref: ref.id)[: args.images]
        keys = [
            (f"incoming/{ref.id}.png", stores["boto3"].put(f"incoming/{ref.id}.png", ref.path.read_bytes()).etag)
            for ref in refs
        ]
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
        for store in stores.values():  # warm-up: connections, credentials, the runtime
            _per_get(store, keys[:5])
        for _ in range(args.rounds):
            for name, store in stores.items():
                figures[name].append(_per_get(store, keys))
        print(f"{len(keys)} Dacon PNGs per pass, {args.rounds} rounds; moto on core {server_core}, this on {own_core}")
        medians = {
            name: (statistics.median(p for p, _ in runs), statistics.median(t for _, t in runs))
            for name, runs in figures.items()
        }
        for name, (process_ms, thread_ms) in medians.items():
            print(f"  {name:8s} process CPU {process_ms:5.2f} ms/GET   calling thread {thread_ms:5.2f} ms/GET")
        print(f"boto3 / obstore, process CPU: {medians['boto3'][0] / medians['obstore'][0]:.2f}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
