"""FID for the continual runs: feature extractors, cached real statistics, torchmetrics' Fréchet distance.

Backends (`fid.backend`):
- domain (offline default): a small CNN trained once on the union of all tasks' training data, one class per
  (domain, label); its penultimate layer (128-d) is the feature. Cached on disk under a fingerprint of the data,
  architecture, epochs and seed, with its test accuracy per task.
- inception: the standard FID Inception-v3 weights (torch-fidelity's, `pip install torch-fidelity`), from
  `fid.inception_path` or downloaded.

The distance itself is torchmetrics' `FrechetInceptionDistance` given the feature module (float64 statistics,
eigenvalue-based trace of the matrix square root). Real statistics are computed once per task and cached.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from common.checkpoint import freeze, save_checkpoint
from common.errors import UserError
from gan_vae.tasks import TaskData, domain_tensor


class DomainClassifier(nn.Module):
    """Small CNN on [B, C, 32, 32] images in [-1, 1]; `features` is the 128-d penultimate layer, standardised with
    the mean and standard deviation it has over the training data (so FIDs are in units of the real data's
    feature spread, comparable between runs whose classifiers differ)."""

    feature_dim = 128

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(True),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(True), nn.MaxPool2d(2),  # 16
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(True),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(True), nn.MaxPool2d(2),  # 8
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(True), nn.MaxPool2d(2),  # 4
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 16, self.feature_dim), nn.ReLU(True))
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_std", torch.ones(self.feature_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.body(x) - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FeatureModule(nn.Module):
    """What torchmetrics calls: images -> float64 features [N, d], in eval mode, without gradients."""

    def __init__(self, extractor: nn.Module, feature_dim: int, to_input=None):
        super().__init__()
        self.extractor = freeze(extractor)
        self.num_features = feature_dim
        self.to_input = to_input

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.extractor.parameters(), None)  # a parameter-free extractor stays on the input's device
        if param is not None:
            x = x.to(param.device)
        if self.to_input is not None:
            x = self.to_input(x)
        return self.extractor(x).double().cpu()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (each entry's name, dtype, shape and bytes, in state_dict order): identifies the
    FID features a run measured with, so that a resume or re-evaluation in other features is noticed."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        h.update(f"{name}:{value.dtype}:{list(value.shape)}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeaturesOf(nn.Module):
    """A model's `features` method as a module's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def domain_keys(tasks: list[TaskData]) -> list[str]:
    """One key per distinct domain: tasks with the same spec share classes in the domain classifier."""
    return list(dict.fromkeys(t.name for t in tasks))


def train_domain_classifier(tasks: list[TaskData], channels: int, epochs: int, seed: int, cache_dir: Path,
                            device: torch.device) -> tuple[DomainClassifier, dict]:
    """The domain classifier (one class per (domain, label)), trained now or loaded from its cache.
    Returns (model in eval mode, info with test accuracy per domain)."""
    keys = domain_keys(tasks)
    first = {k: next(t for t in tasks if t.name == k) for k in keys}
    label_sets = {k: sorted(set(first[k].train_labels.tolist()) | set(first[k].test_labels.tolist())) for k in keys}
    offsets, n = {}, 0
    for k in keys:
        offsets[k] = n
        n += len(label_sets[k])
    h = hashlib.sha256()
    for k in keys:
        t = first[k]
        for arr in (t.train_images, t.train_labels, t.test_images, t.test_labels):
            h.update(np.ascontiguousarray(arr).tobytes())
    h.update(json.dumps(["domain-clf-v2", keys, channels, epochs, seed, [first[k].background for k in keys]]).encode())
    path = Path(cache_dir) / f"domain_classifier_{h.hexdigest()[:16]}.pt"
    for taken in (path, path.with_suffix(".lock")):  # else found only when the trained classifier is saved
        if (taken.exists() or taken.is_symlink()) and not taken.is_file():
            raise UserError(f"{taken} in fid.cache_dir is not a file (a folder, or a dangling link), where the FID "
                            "domain classifier's cache keeps one; move it out of the way, or set another "
                            "fid.cache_dir")
    model = DomainClassifier(channels, n).to(device)
    lock = FileLock(str(path.with_suffix(".lock")))
    try:  # runs sharing fid.cache_dir train it once: the others wait, then load it
        lock.acquire(timeout=0)
    except Timeout:
        tqdm.write(f"waiting for another process that is training the FID domain classifier {path.name} "
                   f"(lock {lock.lock_file})", file=sys.stderr)
        lock.acquire()
    try:
        info = _load_cached_classifier(path, model, device)
        if info is None:
            info = _train_classifier(model, first, keys, label_sets, offsets, channels, epochs, seed, device)
            save_checkpoint({"model": model.state_dict(), "info": info}, path)
    finally:
        lock.release()
    return model.eval(), info


def _load_cached_classifier(path: Path, model: DomainClassifier, device: torch.device) -> dict | None:
    """The cached classifier's info, with its weights loaded into `model`; None when there is no cache file. A file
    that cannot be used (truncated by a killed run, another shape, non-finite weights) is named and trained anew."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        copy.deepcopy(model).load_state_dict(state["model"])  # a failed load leaves `model` as initialised
        info = state["info"]
        if not all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()):
            raise ValueError("its weights are not all finite")
        if not isinstance(info.get("test_acc"), dict):
            raise ValueError("it holds no test accuracy per task")
    except Exception as exc:  # noqa: BLE001 - torch.load and load_state_dict fail in many ways on a damaged file
        tqdm.write(f"warning: the cached FID domain classifier {path} cannot be used ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training it again and replacing it",
                   file=sys.stderr)
        return None
    model.load_state_dict(state["model"])
    return info


def _train_classifier(model: DomainClassifier, first: dict[str, TaskData], keys: list[str],
                      label_sets: dict[str, list[int]], offsets: dict[str, int], channels: int, epochs: int,
                      seed: int, device: torch.device) -> dict:
    """Train `model` on every domain's training split, set its feature standardisation, and measure its test
    accuracy per domain (the returned info)."""
    n = sum(len(v) for v in label_sets.values())

    def dataset(split: str):
        xs, ys = [], []
        for k in keys:
            t = first[k]
            images, labels = (t.train_images, t.train_labels) if split == "train" else (t.test_images, t.test_labels)
            lookup = {lab: offsets[k] + i for i, lab in enumerate(label_sets[k])}
            xs.append(domain_tensor(images, channels, t.background))
            ys.append(torch.as_tensor([lookup[int(y)] for y in labels]))
        return torch.cat(xs), torch.cat(ys)

    with torch.random.fork_rng():  # the caller's RNG stream must not depend on whether the cache existed
        torch.manual_seed(seed)
        _fit_classifier(model, *dataset("train"), epochs, seed, device)
    model.eval()
    x, _ = dataset("train")
    with torch.no_grad():  # standardisation statistics of the features over the training data
        feats = torch.cat([model.body(x[i:i + 512].to(device)).cpu() for i in range(0, len(x), 512)])
        model.feature_mean.copy_(feats.mean(0))
        model.feature_std.copy_(feats.std(0).clamp(min=1e-3))
    info = {"classes": n, "epochs": epochs, "test_acc": {}}
    with torch.no_grad():
        for k in keys:
            t = first[k]
            xt = domain_tensor(t.test_images, channels, t.background)
            lookup = {lab: offsets[k] + i for i, lab in enumerate(label_sets[k])}
            yt = torch.as_tensor([lookup[int(v)] for v in t.test_labels])
            pred = torch.cat([model(xt[i:i + 512].to(device)).argmax(1).cpu() for i in range(0, len(xt), 512)])
            info["test_acc"][k] = float((pred == yt).float().mean() * 100)
    return info


def _fit_classifier(model: DomainClassifier, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                    device: torch.device) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc="domain classifier (FID features)", dynamic_ncols=True, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            xb = x[idx].to(device)
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # light translation augmentation
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def check_inception_path(weights_path: str) -> None:
    """A given fid.inception_path must be a whole file (checked before a run writes anything): present, not empty,
    and, being a zip archive (torch.save's format), not cut short. Loading it (seconds) is left to the run."""
    if not weights_path:
        return
    path = Path(weights_path)
    fetch = (f"the FID Inception-v3 weights file ({INCEPTION_FILE}, {INCEPTION_URL}; copy it from a machine with "
             "network access if this one has none), or use fid.backend=domain")
    if not path.is_file():
        raise UserError(f"fid.inception_path={weights_path}: no such file. Point it at {fetch}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head or (head == b"PK\x03\x04" and not zipfile.is_zipfile(path)):
        state = "empty" if not head else "cut short (a damaged zip archive)"
        raise UserError(f"fid.inception_path={weights_path} is {state}: copy it again; it must be {fetch}")


def inception_features(weights_path: str, channels: int, device: torch.device | str = "cpu") -> FeatureModule:
    """torch-fidelity's FID Inception-v3 (2048-d pool features) on images in [-1, 1], with the weights from
    `weights_path`, or downloaded (into torch.hub's cache) when it is empty. Each way it can fail says what helps."""
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' Inception is torch-fidelity's network
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise UserError("fid.backend=inception needs torch-fidelity: pip install torch-fidelity==0.4.0 (it is in "
                        "requirements.txt), or use fid.backend=domain") from None
    check_inception_path(weights_path)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=weights_path or None)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if weights_path:
            raise UserError(f"fid.inception_path={weights_path} does not hold the FID Inception-v3 weights "
                            f"({detail}); it must be torch-fidelity's {INCEPTION_FILE}") from None
        raise UserError(f"cannot download the FID Inception-v3 weights from {INCEPTION_URL} ({detail}). Without "
                        "network access, copy that file here from a machine that has it and pass "
                        "fid.inception_path=PATH, or use fid.backend=domain") from None

    def to_input(x):  # [-1, 1], C channels -> uint8 RGB, resized by the network itself
        x = x.repeat(1, 3 // channels, 1, 1) if channels == 1 else x
        return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)

    return FeatureModule(net.to(device), 2048, to_input)


class FIDEvaluator:
    """FID of generated or reconstructed images against a task's real test images.

    Real statistics per task are computed once (up to `num_samples` images) and kept; every call returns the FID
    and the numbers of real and fake samples it used."""

    def __init__(self, features: FeatureModule, num_samples: int, batch_size: int = 500):
        if num_samples <= 2:
            raise UserError(f"fid.samples={num_samples}: FID needs more than 2 samples per set (default 5000)")
        self.features, self.num_samples, self.batch_size = features, num_samples, batch_size
        self.real_state: dict[str, dict] = {}

    def _metric(self) -> FrechetInceptionDistance:
        return FrechetInceptionDistance(feature=self.features, reset_real_features=False)

    def add_real(self, key: str, images: torch.Tensor) -> None:
        if key in self.real_state:
            return
        metric = self._metric()
        images = images[: self.num_samples]
        for i in range(0, len(images), self.batch_size):
            metric.update(images[i:i + self.batch_size], real=True)
        self.real_state[key] = {k: getattr(metric, k).clone() for k in
                                ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")}

    def fid(self, key: str, fake_batches) -> dict:
        """FID of the images yielded by `fake_batches` (an iterable of [B, C, 32, 32] tensors) against task `key`."""
        metric = self._metric()
        for name, value in self.real_state[key].items():
            setattr(metric, name, value.clone())
        n = 0
        for batch in fake_batches:
            batch = batch[: self.num_samples - n].detach().cpu()
            if not bool(torch.isfinite(batch).all()):  # torch's eigvals would fail on them with a traceback
                raise UserError(f"the images measured against {key} for FID hold NaN or inf: the model that made "
                                "them has non-finite weights; start a new run with a lower learning rate")
            if len(batch):
                metric.update(batch, real=False)
                n += len(batch)
            if n >= self.num_samples:
                break
        fid = float(metric.compute())
        if not math.isfinite(fid):
            raise UserError(f"the FID against {key} came out {fid} from finite images: the FID features are not "
                            "usable; with fid.backend=domain, delete the cached domain classifier in fid.cache_dir")
        return {"fid": fid, "n_real": int(self.real_state[key]["real_features_num_samples"]), "n_fake": n}
