"""JPEG decode to the model input: the worker's CPU path against nvJPEG on the GPU, per image, side by side.

At 2048² a JPEG costs the worker about 7.5 of its 10 ms of CPU per image even with draft decoding
(README, pipeline rounds), so a GPU host scoring 2,000 images/s would need some 20 cores for JPEG decoding
alone. torchvision's ``decode_jpeg(device="cuda")`` hands the entropy decode and IDCT to nvJPEG; this
prints what that leaves on the CPU, so the worker's JPEG path can be chosen by measurement:

* CPU path as shipped: ``load_pixels`` (draft decode at the largest reduction that still covers the input)
  + ``to_model_input``; thread CPU ms and wall ms per image;
* nvJPEG: a batch of encoded JPEGs decoded on ``--device`` in one call, resized there to the input
  (bilinear, antialiased) and waited for; process CPU ms (the driver's threads included) and wall ms per
  image, at each ``--batch``;
* how far the two inputs are apart (grey levels, mean and largest): they are not the same decode
  (draft's scaled IDCT against a full decode and a resize), so scores would shift; a model is built from
  one path and must be scored with it.

On a machine without CUDA, ``--device cpu`` times torchvision's CPU decoder instead (a rehearsal).

    python bench/bench_gpu_decode.py [--device cuda] [--images 32] [--batch 32 128] [--jpeg-size 2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dacon_test, jpeg_payloads
from models import PatchCoreConfig
from models.images import load_pixels, to_model_input


def cpu_path(payloads: list[bytes], size: int) -> list[np.ndarray]:
    return [np.asarray(to_model_input(load_pixels(data, size=size), size)) for data in payloads]


def nvjpeg_path(encoded: list[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """(n, size, size, 3) uint8 on the host, decoded and resized on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    batch = torch.stack(
        [
            F.interpolate(
                image.unsqueeze(0).float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )[0]
            for image in decoded
        ]
    )
    return batch.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def measure(function, n_images: int, rounds: int, device: torch.device) -> tuple[float, float]:
    """Median (process CPU ms, wall ms) per image over ``rounds`` calls."""
    cpu, wall = [], []
    function()  # warm-up (nvJPEG handles, kernels)
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        function()
        cpu.append((time.process_time() - started_cpu) / n_images * 1000)
        wall.append((time.perf_counter() - started_wall) / n_images * 1000)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=32, help="distinct JPEGs made from Dacon test images")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--jpeg-size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = PatchCoreConfig().image_size
    torch.set_num_threads(1)  # as one worker thread decodes
    test = sorted(dacon_test(), key=lambda ref: ref.id)
    sources = [test[i % len(test)].path.read_bytes() for i in range(args.images)]
    jpegs = jpeg_payloads(sources, args.jpeg_size)
    print(
        f"{len(jpegs)} JPEGs {args.jpeg_size}² (mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB), "
        f"input {size}², nvJPEG on {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else " (rehearsal: CPU decoder)")
    )

    cpu_inputs = cpu_path(jpegs, size)
    cpu_ms, cpu_wall = measure(lambda: cpu_path(jpegs, size), len(jpegs), args.rounds, torch.device("cpu"))
    print(f"CPU path as shipped (draft decode + resize): {cpu_ms:6.2f} ms CPU/image, {cpu_wall:6.2f} ms wall/image")

    for batch in args.batch:
        chosen = [jpegs[i % len(jpegs)] for i in range(batch)]
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in chosen]
        ms, wall = measure(lambda encoded=encoded: nvjpeg_path(encoded, size, device), batch, args.rounds, device)
        print(
            f"nvJPEG batch {batch:4d}: {ms:6.2f} ms CPU/image, {wall:6.2f} ms wall/image "
            f"(the CPU path costs {cpu_ms / max(ms, 1e-6):5.1f}× this CPU)"
        )

    gpu_inputs = nvjpeg_path([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs], size, device)
    difference = np.abs(gpu_inputs.numpy().astype(int) - np.stack(cpu_inputs).astype(int))
    print(f"input difference, nvJPEG vs CPU path: mean {difference.mean():.2f}, largest {difference.max()} grey levels")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
