"""ReConPatch (Hyun et al., WACV 2024): a trained linear modulation of the frozen patch features.

A representation layer ``f`` and a projection layer ``g`` are trained on nominal patches with the relaxed
contrastive loss. Pseudo-labels come from an EMA copy ``(f̄, ḡ)``: a Gaussian kernel on its projections
(pairwise similarity) mixed with the overlap of their k-nearest-neighbour sets (contextual similarity).
After training only ``f`` is kept: its output replaces the raw features everywhere downstream (coreset,
banks, k-NN, eq. 7, maps, fold thresholds); ``g`` is saved only so a training can be resumed.

Where the paper is silent the choices here were measured (``bench/bench_reconpatch.py``) and are said in
the docstrings: the Gaussian kernel's σ is relative to the batch's mean squared distance (feature scales
differ by orders of magnitude between backbones), a patch counts among its own k nearest neighbours, the
row mean of the loss's distances leaves out the patch itself, R_{k/2} uses ``max(1, k // 2)`` neighbours.

Everything is seeded (initialisation and batches) and runs on the CPU unless CUDA is asked for; on CUDA
deterministic kernels are switched on for the duration of the training.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import PatchCoreConfig
from models.errors import ArtifactError, ConfigError
from models.threads import one_torch_thread

logger = logging.getLogger(__name__)

#: Progress of the training: (stage, done steps, total steps, smoothed loss). Library code reports; the CLI
#: draws.
LossProgress = Callable[[str, int, int, float], None]

#: Steps per early-stopping window: the loss is averaged over a window, and training stops once
#: ``reconpatch_patience`` windows in a row fail to improve on the best window by ``_MIN_IMPROVEMENT``.
_WINDOW = 25
_MIN_IMPROVEMENT = 0.005
STAGE = "reconpatch"


# --- the layers ---------------------------------------------------------------------------------------


class PatchHead(nn.Module):
    """``f`` or ``g``: one linear layer, or Linear → ReLU → Linear when ``hidden > 0``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        if hidden > 0:
            self.layers = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        else:
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(n_patches, in_dim) → (n_patches, out_dim)."""
        return self.layers(patches)


# --- pseudo-labels and loss (pure functions on one mini-batch) ----------------------------------------


def squared_distances(z: torch.Tensor) -> torch.Tensor:
    """‖zᵢ − zⱼ‖² for every pair of rows of z (n, d), clamped at 0 (the Gram form can dip below)."""
    norms = (z * z).sum(dim=1)
    return (norms[:, None] + norms[None, :] - 2.0 * z @ z.T).clamp_min(0.0)


def pairwise_similarity(z_ema: torch.Tensor, sigma: float) -> torch.Tensor:
    """w_pair = exp(−‖z̄ᵢ − z̄ⱼ‖² / (σ · mean‖z̄ − z̄'‖²)), (n, n).

    The paper's σ is absolute, tied to the scale of WRN-50 features; here it is relative to the batch's
    mean squared distance between distinct patches, so one value holds for every backbone and layer set
    (σ = 1: a pair at the mean squared distance gets weight e⁻¹).
    """
    squared = squared_distances(z_ema)
    n = z_ema.shape[0]
    scale = squared.sum() / max(n * (n - 1), 1)
    return torch.exp(-squared / (sigma * scale.clamp_min(1e-12)))


def nearest_neighbours(squared: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (n, k) of each row's k nearest rows, nearest first, the row itself always first.

    Forcing the row itself first matters where patches repeat exactly (flat background, binary scans):
    among many neighbours at distance 0 a plain top-k might leave the row out, and R_{k/2} would be empty.
    """
    n = squared.shape[0]
    ranked = squared.clone()
    ranked.fill_diagonal_(-1.0)
    return torch.topk(ranked, min(k, n), dim=1, largest=False).indices


def contextual_similarity(z_ema: torch.Tensor, k: int) -> torch.Tensor:
    """w_ctx (n, n): k-NN overlap, query-expanded over the reciprocal neighbours R_{k/2}, symmetrised.

    w̃ᵢⱼ = |N_k(i) ∩ N_k(j)| / |N_k(i)| for j ∈ N_k(i), else 0; ŵᵢ = mean of w̃ₗ over l ∈ R_{k/2}(i), where
    R_{k/2}(i) = {j : j ∈ N_{k/2}(i) and i ∈ N_{k/2}(j)} (never empty: i is its own neighbour);
    w_ctx = ½(ŵ + ŵᵀ).

    Computed on the index lists (n·k³ comparisons for the overlaps, n·(k/2)·n for the expansion) rather
    than with n×n membership matrices and their products: 20× less work for a batch of 512.
    """
    n = z_ema.shape[0]
    order = nearest_neighbours(squared_distances(z_ema), k)  # N_k(i), (n, k)
    k = order.shape[1]
    # overlap[i, a] = |N_k(i) ∩ N_k(order[i, a])|
    overlap = (order[order][:, :, :, None] == order[:, None, None, :]).any(dim=3).sum(dim=2)
    w_tilde = torch.zeros(n, n, dtype=z_ema.dtype, device=z_ema.device)
    w_tilde.scatter_(1, order, overlap.to(z_ema.dtype) / k)
    half = order[:, : max(1, k // 2)]  # N_{k/2}(i): the first of the sorted k nearest
    rows = torch.arange(n, device=z_ema.device)
    reciprocal = (half[half] == rows[:, None, None]).any(dim=2).to(z_ema.dtype)  # i ∈ N_{k/2}(j) for j ∈ N_{k/2}(i)
    w_hat = (w_tilde[half] * reciprocal[:, :, None]).sum(dim=1) / reciprocal.sum(dim=1, keepdim=True)
    return 0.5 * (w_hat + w_hat.T)


def pseudo_labels(z_ema: torch.Tensor, *, sigma: float, k: int, alpha: float) -> torch.Tensor:
    """w = α·w_pair + (1 − α)·w_ctx (n, n), from the EMA network's projections."""
    return alpha * pairwise_similarity(z_ema, sigma) + (1.0 - alpha) * contextual_similarity(z_ema, k)


def relaxed_contrastive_loss(z: torch.Tensor, w: torch.Tensor, margin: float) -> torch.Tensor:
    """L = (1/n) Σᵢ Σ_{j≠i} [wᵢⱼ δᵢⱼ² + (1 − wᵢⱼ) max(m − δᵢⱼ, 0)²], δᵢⱼ = ‖zᵢ − zⱼ‖ / mean_{l≠i} ‖zᵢ − zₗ‖.

    The pair of a patch with itself is left out (its distance is 0 and its square root has no gradient);
    so is it from the row mean, which is then the mean distance to the *other* patches of the batch.
    """
    n = z.shape[0]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    with torch.no_grad():  # the weights are labels: no gradient, so build them outside the graph
        pull_weight = w * (1.0 - eye)
        push_weight = (1.0 - w) * (1.0 - eye)
    distance = (squared_distances(z) + eye).sqrt() - eye  # the diagonal at sqrt(1) - 1 = 0, differentiable
    delta = distance / (distance.sum(dim=1, keepdim=True) / max(n - 1, 1)).clamp_min(1e-12)
    return ((pull_weight * delta.square()).sum() + (push_weight * torch.relu(margin - delta).square()).sum()) / n


# --- training -----------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What one training of (f, g) did: steps run, loss per window, seconds, whether it stopped early."""

    steps: int
    window_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic CUDA kernels while training; on the CPU, one intra-op thread.

    The CPU kernels used here are deterministic already; one thread is for speed. A training step is a
    few hundred small operations on (batch × batch) matrices, each too small to split: on the shared
    2-core machine, two OpenMP threads made a step 10–60× slower than one (every operation waits at a
    barrier for a thread the scheduler has parked). One thread also keeps the weights independent of
    the machine's core count.
    """
    if device.type != "cuda":
        with one_torch_thread():
            yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _principal_init(f: PatchHead, flat: np.ndarray, generator: torch.Generator, sample: int = 20_000) -> None:
    """Start a linear f at the projection on the top principal axes of the training patches (centred).

    Measured: from the default random initialisation the short CPU training ends below plain PatchCore
    (magnetic tile AUROC 0.798 vs 0.852); from the principal axes f starts where PatchCore on a PCA of the
    features is and the contrastive loss only modulates it. Axes come from ``torch.linalg.eigh`` of the
    covariance of a seeded sample, each with its sign fixed (largest component positive), so the start is
    reproducible; axes beyond the input width keep their random initialisation.
    """
    rows = torch.randperm(flat.shape[0], generator=generator)[:sample]
    x = torch.from_numpy(np.ascontiguousarray(flat[rows.numpy()])).double()
    mean = x.mean(dim=0)
    covariance = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    axes = vectors.flip(dims=[1]).T[: f.out_dim]  # (≤ out_dim, in_dim), largest variance first
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    axes = axes * signs
    layer = f.layers[0]
    with torch.no_grad():
        layer.weight[: len(axes)] = axes.float()
        layer.bias[: len(axes)] = -(axes @ mean).float()


def _ema_update(target: nn.Module, source: nn.Module, gamma: float) -> None:
    """θ̄ ← γθ̄ + (1 − γ)θ."""
    with torch.no_grad():
        for ema, live in zip(target.parameters(), source.parameters(), strict=True):
            ema.mul_(gamma).add_(live, alpha=1.0 - gamma)


def train_heads(
    patches: np.ndarray,
    config: PatchCoreConfig,
    *,
    seed: int,
    device: str | torch.device | None = "cpu",
    progress: LossProgress | None = None,
    stage: str = STAGE,
) -> tuple[PatchHead, PatchHead, TrainingRun]:
    """Train (f, g) on nominal patches (n_images, n_patches, in_dim) or (n, in_dim); returns them on the CPU.

    Each step draws ``reconpatch_batch`` patches uniformly (without replacement within the batch) from all
    training images with a generator seeded by ``seed``, so the same patches and config give the same
    weights. Stops at ``reconpatch_steps`` or when the windowed loss has not improved for
    ``reconpatch_patience`` windows.
    """
    flat = patches.reshape(-1, patches.shape[-1])
    n_patches, in_dim = flat.shape
    if n_patches < 2:
        raise ConfigError(f"ReConPatch needs at least 2 training patches, got {n_patches}")
    device = resolve_device(device)
    started = time.perf_counter()
    torch_seed = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=torch_seed)))
        f = PatchHead(in_dim, config.reconpatch_dim, config.reconpatch_hidden)
        g = PatchHead(config.reconpatch_dim, config.reconpatch_projection_dim, config.reconpatch_projection_hidden)
    batch = min(config.reconpatch_batch, n_patches)
    source = torch.from_numpy(np.ascontiguousarray(flat))
    run = TrainingRun(steps=0)
    window: list[float] = []
    best, stale = math.inf, 0
    with _deterministic(device):
        if config.reconpatch_hidden == 0:
            _principal_init(f, flat, torch_seed)
        if config.reconpatch_projection_hidden == 0 and g.in_dim == g.out_dim:
            with torch.no_grad():
                g.layers[0].weight.copy_(torch.eye(g.out_dim))
                g.layers[0].bias.zero_()
        student = nn.Sequential(f, g).to(device)
        teacher = copy.deepcopy(student).requires_grad_(False)
        optimizer = torch.optim.Adam(student.parameters(), lr=config.reconpatch_lr)
        for step in range(1, config.reconpatch_steps + 1):
            rows = torch.randperm(n_patches, generator=torch_seed)[:batch]
            x = source[rows].to(device=device, dtype=torch.float32)
            with torch.no_grad():
                w = pseudo_labels(
                    teacher(x), sigma=config.reconpatch_sigma, k=config.reconpatch_k, alpha=config.reconpatch_alpha
                )
            loss = relaxed_contrastive_loss(student(x), w, config.reconpatch_margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _ema_update(teacher, student, config.reconpatch_ema)
            window.append(float(loss.detach()))
            run.steps = step
            if len(window) == _WINDOW:
                mean = sum(window) / len(window)
                run.window_losses.append(mean)
                window.clear()
                if progress:
                    progress(stage, step, config.reconpatch_steps, mean)
                if mean < best * (1.0 - _MIN_IMPROVEMENT):
                    best, stale = mean, 0
                else:
                    stale += 1
                    if stale >= config.reconpatch_patience:
                        run.stopped_early = True
                        break
    if progress:
        last = run.window_losses[-1] if run.window_losses else float(np.mean(window)) if window else 0.0
        progress(stage, config.reconpatch_steps, config.reconpatch_steps, last)
    run.seconds = time.perf_counter() - started
    logger.info(
        "reconpatch: %d steps in %.1fs, loss %s → %s%s",
        run.steps,
        run.seconds,
        f"{run.window_losses[0]:.4f}" if run.window_losses else "-",
        f"{run.window_losses[-1]:.4f}" if run.window_losses else "-",
        " (plateau)" if run.stopped_early else "",
    )
    f, g = student[0].cpu().eval(), student[1].cpu().eval()
    return f.requires_grad_(False), g.requires_grad_(False), run


# --- the trained representation of a model -------------------------------------------------------------


class PatchRepresentation:
    """The trained ``f`` of a model: one shared by every fold, or one per fold (``per_fold``).

    :meth:`transform` is the one way patches enter a fold's feature space, at training and at scoring: the
    input is rounded through float16 (as the stored training features are), f runs in float32 on the CPU
    and its output is rounded through float16 again, so an image scores the same whether it was calibrated
    on or scored later, whatever the batch it came in.
    """

    def __init__(
        self,
        heads: Sequence[tuple[PatchHead, PatchHead]],
        *,
        per_fold: bool,
        runs: Sequence[TrainingRun] = (),
    ) -> None:
        if not heads:
            raise ConfigError("a ReConPatch representation needs at least one trained f")
        self.heads = tuple(heads)
        self.per_fold = per_fold
        self.runs = tuple(runs)

    @property
    def in_dim(self) -> int:
        return self.heads[0][0].in_dim

    @property
    def out_dim(self) -> int:
        return self.heads[0][0].out_dim

    def head(self, fold: int) -> PatchHead:
        return self.heads[fold if self.per_fold else 0][0]

    @torch.inference_mode()
    def transform(self, patches: np.ndarray, fold: int) -> np.ndarray:
        """Fold ``fold``'s features of patches (..., in_dim) → (..., out_dim), float32 values of float16."""
        shape = patches.shape
        flat = torch.from_numpy(np.ascontiguousarray(patches.reshape(-1, shape[-1]))).half().float()
        out = torch.cat([self.head(fold)(flat[b : b + 65_536]) for b in range(0, max(len(flat), 1), 65_536)])
        return out.half().float().numpy().reshape(*shape[:-1], self.out_dim)

    def fingerprint(self) -> bytes:
        """The bytes of every f and g, in order (part of the model version)."""
        digest = hashlib.sha256()
        for f, g in self.heads:
            for name, tensor in sorted({**_prefixed(f, "f."), **_prefixed(g, "g.")}.items()):
                digest.update(name.encode())
                digest.update(tensor.numpy().tobytes())
        return digest.digest()

    def file_names(self) -> list[str]:
        return [f"reconpatch_{index}.safetensors" for index in range(len(self.heads))]

    def save(self, directory: Path) -> dict[str, str]:
        """``reconpatch_<i>.safetensors`` (keys ``f.*`` and ``g.*``) per trained pair; returns name → sha256."""
        from models.artifacts import sha256_file

        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, (f, g) in zip(self.file_names(), self.heads, strict=True):
            path = directory / name
            tensors = {key: value.contiguous() for key, value in {**_prefixed(f, "f."), **_prefixed(g, "g.")}.items()}
            save_file(tensors, str(path), metadata={"format": "waferwatch-reconpatch-1"})
            files[name] = sha256_file(path)
        return files

    def describe(self) -> dict[str, object]:
        """The manifest entry: files, dims and how each training went."""
        return {
            "per_fold": self.per_fold,
            "in_dim": self.in_dim,
            "dim": self.out_dim,
            "files": self.file_names(),
            "runs": [
                {"steps": r.steps, "seconds": round(r.seconds, 3), "stopped_early": r.stopped_early,
                 "loss_first": r.window_losses[0] if r.window_losses else None,
                 "loss_last": r.window_losses[-1] if r.window_losses else None}
                for r in self.runs
            ],
        }  # fmt: skip

    @classmethod
    def load(
        cls, directory: Path, files: dict[str, str], config: PatchCoreConfig, *, in_dim: int, n_folds: int
    ) -> PatchRepresentation:
        """Read the pairs saved by :meth:`save`, each file checked against ``files`` (name → sha256) and
        its tensors against the dims of ``config``."""
        from models.artifacts import sha256_file

        expected = n_folds if config.reconpatch_per_fold else 1
        names = [f"reconpatch_{index}.safetensors" for index in range(expected)]
        heads = []
        for name in names:
            path = directory / name
            if name not in files:
                raise ArtifactError(f"{directory}: {name} is not listed with a sha256; rebuild the model")
            if not path.is_file():
                raise ArtifactError(f"{path} is missing; rebuild or re-copy the model")
            actual = sha256_file(path)
            if actual != files[name]:
                raise ArtifactError(
                    f"{path} has sha256 {actual[:12]}… but {files[name][:12]}… is recorded: the model was modified "
                    "or copied incompletely; rebuild or re-copy it"
                )
            tensors = load_file(str(path))
            f = PatchHead(in_dim, config.reconpatch_dim, config.reconpatch_hidden)
            g = PatchHead(config.reconpatch_dim, config.reconpatch_projection_dim, config.reconpatch_projection_hidden)
            for prefix, module in (("f.", f), ("g.", g)):
                state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
                try:
                    module.load_state_dict(state, strict=True)
                except RuntimeError as exc:
                    raise ArtifactError(f"{path} does not hold the layers of the recorded config: {exc}") from exc
            heads.append((f.eval().requires_grad_(False), g.eval().requires_grad_(False)))
        return cls(heads, per_fold=config.reconpatch_per_fold)


def _prefixed(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}


def fit_representation(
    parts: Sequence[np.ndarray],
    config: PatchCoreConfig,
    *,
    device: str | torch.device | None = "cpu",
    progress: LossProgress | None = None,
) -> PatchRepresentation:
    """Train one (f, g) per part: one part (all training images) when shared, one per fold otherwise.

    Part ``i`` is trained with seed ``seed · 1000 + 500 + i``, so a fold's f does not depend on whether
    the others were trained in the same process.
    """
    heads, runs = [], []
    for index, part in enumerate(parts):
        stage = f"{STAGE} {index + 1}/{len(parts)}" if len(parts) > 1 else STAGE
        f, g, run = train_heads(
            part, config, seed=config.seed * 1_000 + 500 + index, device=device, progress=progress, stage=stage
        )
        heads.append((f, g))
        runs.append(run)
    return PatchRepresentation(heads, per_fold=config.reconpatch_per_fold, runs=runs)
