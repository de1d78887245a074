"""gan_vae evaluation: FID features and real statistics, the matrices R[i][j] of every task seen so far (teacher
FID, student FID, reconstruction MSE and FID), with forgetting and backward transfer."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from gan_vae import forgetting
from gan_vae.experts import ExpertPool
from gan_vae.fid import (FeatureModule, FeaturesOf, FIDEvaluator, inception_features, train_domain_classifier,
                         weights_digest)
from models import TaskVAE


def eval_seed(seed: int, task: int, evaluated: int, metric: int) -> int:
    """The seed of the samples behind R[task][evaluated] of one metric (0: teacher, 1: student): a pure function,
    so the matrices do not depend on what drew from the global RNG before, and a re-evaluation reproduces them."""
    return ((seed * 1_000 + task) * 1_000 + evaluated) * 10 + metric + 1


def fid_bar(total: int, desc: str) -> tqdm:
    """A progress bar over FID computations, each seconds long (features of up to fid.samples images); gone when
    done. gan_vae runs in one process, so there is no other rank to keep quiet."""
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


METRICS = ("teacher_fid", "student_fid", "recon_mse", "recon_fid")
FID_METRICS = ("teacher_fid", "student_fid", "recon_fid")  # each with <key>_samples: [n_real, n_fake] per cell


class Evaluation:
    """FID features and the real images' statistics (with real-vs-real reference FIDs), the evaluation of every
    task seen so far, and the matrices R[i][j] with forgetting and backward transfer (`results`)."""

    def __init__(self, cfg, device: torch.device, tasks: list, train_x: list[torch.Tensor],
                 test_x: list[torch.Tensor]):
        self.cfg, self.device, self.tasks, self.train_x, self.test_x = cfg, device, tasks, train_x, test_x
        self.matrices = {k: [] for k in (*METRICS, *(f"{k}_samples" for k in FID_METRICS))}
        self.fid_info: dict = {}
        self.evaluator: FIDEvaluator | None = None
        self.features_digest: str | None = None  # of the FID features' weights (fid.weights_digest), once built

    def build(self) -> None:
        cfg = self.cfg
        if cfg.fid.backend == "domain":
            cache = Path(cfg.fid.cache_dir or Path(cfg.run.out_dir) / "fid_cache")
            clf, info = train_domain_classifier(self.tasks, cfg.data.channels, cfg.fid.classifier_epochs,
                                                cfg.train.seed, cache, self.device)
            features = FeatureModule(FeaturesOf(clf), clf.feature_dim)
            self.fid_info = {"backend": "domain", "classifier_test_acc": info["test_acc"]}
        else:
            features = inception_features(cfg.fid.inception_path, cfg.data.channels, self.device)
            self.fid_info = {"backend": "inception"}
        self.evaluator = FIDEvaluator(features, cfg.fid.samples)
        self.features_digest = weights_digest(features)
        count = len(self.tasks)
        bar = fid_bar(2 * count + count * count, "FID: real statistics and real-vs-real reference")
        for j, x in enumerate(self.test_x):
            self.evaluator.add_real(f"test{j}", x)
            bar.update()
        for j, x in enumerate(self.train_x):
            self.evaluator.add_real(f"train{j}", x)
            bar.update()
        self.fid_info["samples"] = cfg.fid.samples
        # reference points for teacher.fid_threshold: real train images of task i against real test images of
        # task j, in the same features (diagonal: in-domain; off-diagonal: cross-domain)
        real = [[self.fid_of(f"test{j}", lambda n, i=i, k=[0]: self._take(self.train_x[i], k, n), len(self.train_x[i]),
                             bar) for j in range(count)] for i in range(count)]
        bar.close()
        self.fid_info["real_train_vs_test"] = [[r["fid"] for r in row] for row in real]
        self.fid_info["real_train_vs_test_samples"] = [[[r["n_real"], r["n_fake"]] for r in row] for row in real]

    @staticmethod
    def _take(x: torch.Tensor, cursor: list[int], n: int) -> torch.Tensor:
        """The next n images of x (cursor[0] is the position): real images fed to FID in order."""
        out = x[cursor[0]:cursor[0] + n]
        cursor[0] += n
        return out

    def batches(self, make, total: int, batch: int = 500):
        """Yield `make(n)` batches until `total` images."""
        done = 0
        while done < total:
            n = min(batch, total - done)
            yield make(n)
            done += n

    def fid_of(self, key: str, make, total: int, bar: tqdm | None = None) -> dict:
        measured = self.evaluator.fid(key, self.batches(make, min(total, self.cfg.fid.samples)))
        if bar is not None:
            bar.update()
        return measured

    @torch.no_grad()
    def evaluate(self, i: int, pool: ExpertPool, student: TaskVAE) -> dict:
        """Row i of every matrix (each task j <= i), and of every FID's sample counts [n_real, n_fake]. Samples come
        from generators seeded by (seed, i, j) alone: evaluation neither reads nor advances the global RNG."""
        student.eval()
        rows = {k: [] for k in self.matrices}
        seed = self.cfg.train.seed

        def put(key: str, measured: dict) -> None:
            rows[key].append(measured["fid"])
            rows[f"{key}_samples"].append([measured["n_real"], measured["n_fake"]])

        bar = fid_bar(len(FID_METRICS) * (i + 1), f"task {i}: evaluation of tasks 0-{i} (FID)")
        for j in range(i + 1):
            x = self.test_x[j][: self.cfg.fid.samples]
            expert = pool.of_task(j)
            g_teacher = torch.Generator().manual_seed(eval_seed(seed, i, j, 0))
            put("teacher_fid", self.fid_of(f"test{j}", lambda n: expert.sample(n, g_teacher), len(x), bar))
            g_student = torch.Generator().manual_seed(eval_seed(seed, i, j, 1))
            tasks = torch.full((len(x),), j, dtype=torch.long, device=self.device)
            put("student_fid", self.fid_of(f"test{j}", lambda n: student.sample(tasks[:n], g_student), len(x), bar))
            recon = torch.cat([student.reconstruct(x[k:k + 500].to(self.device)).cpu()
                               for k in range(0, len(x), 500)])
            rows["recon_mse"].append(float(((recon - x) / 2).pow(2).mean()))  # on the [0, 1] pixel scale
            put("recon_fid", self.evaluator.fid(f"test{j}", iter([recon])))
            bar.update()
        bar.close()
        student.train()
        return rows

    def results(self, pool: ExpertPool) -> dict:
        t = len(self.matrices["teacher_fid"])
        padded = {k: [row + [None] * (len(self.tasks) - len(row)) for row in m] for k, m in self.matrices.items()}
        out = {**padded, "experts": len(pool.experts), "task_to_expert": pool.task_to_expert,
               "tasks": list(self.cfg.data.tasks), "tasks_done": t, "fid": self.fid_info,
               "forgetting": {}, "forgetting_percent": {}, "bwt": {}}
        for k in METRICS:
            square = [row[: t] for row in self.matrices[k]]
            out["forgetting"][k] = forgetting.forgetting(square)
            out["forgetting_percent"][k] = forgetting.forgetting_percent(square)
            out["bwt"][k] = forgetting.backward_transfer(square)
        return out
