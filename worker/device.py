"""The start-up check of the compute device a worker was asked for.

A worker told to use CUDA (``WAFERWATCH_DEVICE=cuda`` or ``cuda:N``) on a host where torch cannot reach a
GPU would otherwise start, look healthy and fail every batch, or, with a CPU-only or too-new torch build,
never say why. :func:`device_problem` turns that into one line naming the setting, what torch sees and
what to do; ``waferwatch worker`` prints it and exits non-zero before it consumes anything.
"""

from __future__ import annotations

__all__ = ["device_problem"]

#: Oldest NVIDIA driver for each CUDA major version of a torch build (NVIDIA's minor-version compatibility).
MIN_DRIVER = {"12": "525", "13": "580"}


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here, in one line, or None when it can (or is ``cpu``/``auto``)."""
    if not device.startswith("cuda"):
        return None
    import torch

    build = torch.version.cuda
    if not build:
        return (
            f"WAFERWATCH_DEVICE={device} but this torch ({torch.__version__}) is a CPU-only build: install a CUDA "
            "build (the image's TORCH_CUDA build argument) or set WAFERWATCH_DEVICE=cpu"
        )
    if not torch.cuda.is_available():
        driver = MIN_DRIVER.get(build.split(".")[0], "a matching")
        return (
            f"WAFERWATCH_DEVICE={device} but torch {torch.__version__} (built for CUDA {build}) sees no GPU: it "
            f"needs an NVIDIA driver >= {driver} and a GPU reserved for this container (deploy.resources "
            "device_ids in docker-compose.yml, NVIDIA Container Toolkit on the host); or set WAFERWATCH_DEVICE=cpu"
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        return (
            f"WAFERWATCH_DEVICE={device} but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1}): "
            "use cuda (the first visible GPU) or reserve that GPU for this container"
        )
    return None
