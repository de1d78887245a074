"""Optional steps never move training's random streams: a teacher cache or pre-decoded copy built in this run
gives the same numbers as one reused, for every KD method (issue 16: the pooled hint's epoch-0 loss, then named
fitnet, was 10.667 with the cache built, 11.524 with it reused)."""
import json
import random

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_ONLINE, read_metrics

import kd_methods
from common.config import load_config
from common.distributed import DistInfo
from common.rng import rng_isolated, rng_state, state_digest

# every registered method, plus kd with logit standardisation, plus the pre-decoded data path
# (fitnet runs on the online teacher only: its case checks that building its regressor draws nothing extra)
CASES = {**{name: [f"kd.method={name}"] for name in kd_methods.KD_METHODS if name != "fitnet"},
         "fitnet": ["kd.method=fitnet", "teacher.mode=online"],
         "kd-logit_standardize": ["kd.method=kd", "kd.logit_standardize=true"],
         "kd-preprocessed": ["kd.method=kd", "data.preprocessed=true"]}


def _config(tmp_path, name: str, extra: list[str]):
    from engine.schema import Config, validate
    online = "teacher.mode=online" in extra  # no cache: without TINY's cache keys, which it would refuse unread
    cache = [] if online else [f"teacher.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(Config, None, [*(TINY_ONLINE if online else TINY), "train.epochs=1", *extra,
                                     f"run.out_dir={tmp_path}", f"run.name={name}", *cache,
                                     f"data.preprocess_dir={tmp_path / 'predecoded'}"])
    validate(cfg)
    return cfg


def test_rng_isolated_restores_every_stream():
    torch.manual_seed(0)
    before = state_digest(rng_state())
    with pytest.raises(RuntimeError):
        with rng_isolated():
            random.random(), np.random.rand(), torch.rand(1)
            raise RuntimeError  # restored on the way out of an exception too
    assert state_digest(rng_state()) == before


@pytest.mark.parametrize("case", CASES)
def test_trainer_state_is_the_same_whether_caches_were_built_or_reused(tmp_path, case):
    """After Trainer.__init__, every random stream and every trainable weight (student and the method's own parts,
    e.g. a hint regressor) are the same when the teacher cache / pre-decoded copy was built as when reused."""
    from engine.trainer import Trainer
    states = []
    for name in ("built", "reused"):
        trainer = Trainer(_config(tmp_path, name, CASES[case]), DistInfo(), None)
        if trainer.cache is not None:
            assert trainer.cache_info["built"] == (name == "built")
        states.append((state_digest(rng_state()), state_digest(trainer.distiller.state_dict())))
    assert states[0] == states[1]


@pytest.mark.parametrize("case", ["pooled_hint", "kd-preprocessed"])
def test_a_run_that_reuses_the_cache_reproduces_the_run_that_built_it(tmp_path, case):
    """End to end, to the last digit: the first run builds, the second reuses (the two cases that differed)."""
    from engine.run import run_training
    results = [run_training(_config(tmp_path, name, CASES[case]), DistInfo()) for name in ("built", "reused")]
    losses = [read_metrics(tmp_path / name)[0]["train/loss"] for name in ("built", "reused")]
    assert losses[0] == losses[1]
    assert results[0]["test/acc1"] == results[1]["test/acc1"]
    assert json.loads((tmp_path / "reused" / "results.json").read_text())["time/teacher_cache_build_s"] == 0.0


def test_latency_report_leaves_the_random_streams_alone():
    from engine.evaluation import measure_latency
    from engine.optim import autocast_for
    cpu, model = torch.device("cpu"), torch.nn.Conv2d(3, 2, 3)
    before = state_digest(rng_state())
    measure_latency(model, 1, 8, cpu, False, autocast_for("off", cpu), repeats=1)
    assert state_digest(rng_state()) == before
