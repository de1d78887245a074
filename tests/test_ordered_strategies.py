"""Strategies that set the order within an epoch (`Strategy.ordered`): the sampler trains an ordered selection in
the order it is given, on one rank and sharded over several, with the exact sample accounting of every strategy;
examples/plugins/hard_first.py, registered from its file alone, trains hardest first end to end."""
import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, read_metrics, run_script

from common.errors import UserError
from curriculum_dataloader import STRATEGY_REGISTRY, CurriculumSampler, Strategy
from imagedata.samplers import TrainBatchSampler, pad_and_shard

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "hard_first.py"
DIFF = np.random.default_rng(3).random(101)
DIFF[::9] = 0.5  # ties, which the random tie-break orders


@pytest.fixture
def registry(monkeypatch):
    """STRATEGY_REGISTRY with hard_first (from the plugin file) and easiest_first_ordered, for this test only."""
    monkeypatch.setattr(STRATEGY_REGISTRY, "_entries", dict(STRATEGY_REGISTRY._entries))
    runpy.run_path(str(PLUGIN))
    STRATEGY_REGISTRY.register("easiest_first_ordered", help="test: the easiest M, easiest first")(EasiestFirst)
    return STRATEGY_REGISTRY


class EasiestFirst(Strategy):
    """The M = ceil(f N) easiest samples, easiest first."""

    ordered = True

    def choose(self, pool, m, rng, tie_break):
        return np.lexsort((tie_break, pool.difficulty))[:m]


def _rank_batches(strategy, fraction, world, batch_size, epoch=2, **kw):
    """Every rank's batches of (index, epoch, valid) for one epoch, and the global order they come from."""
    out, order = [], None
    for rank in range(world):
        s = CurriculumSampler(DIFF, strategy, fraction, 0.5, 7, world, rank, **kw)
        s.set_epoch(epoch)
        order = s.select()
        out.append(list(TrainBatchSampler(s, batch_size)))
    return out, order, s.num_selected()


@pytest.mark.parametrize("strategy", ["hard_first", "easiest_first_ordered"])
@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("fraction,batch_size", [(0.5, 4), (0.3, 5), (1.0, 8)])
def test_ordered_selection_trains_in_order_over_ranks(registry, strategy, world, fraction, batch_size):
    per_rank, order, m = _rank_batches(strategy, fraction, world, batch_size)
    assert len(order) == m == len(set(order.tolist()))
    key = DIFF[order] if strategy == "easiest_first_ordered" else -DIFF[order]
    assert np.all(np.diff(key) >= 0)  # the order the strategy set: the selection is not shuffled
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1  # every rank takes the same number of steps
    trained, padded = [], []
    for k in range(steps.pop()):
        # step k over all ranks: the next block of the order, each rank's share strided from it
        block = [i for batches in per_rank for i, _, valid in batches[k] if valid]
        assert sorted(block) == sorted(order[len(trained):len(trained) + len(block)].tolist())
        trained += order[len(trained):len(trained) + len(block)].tolist()
        padded += [i for batches in per_rank for i, _, valid in batches[k] if not valid]
    assert trained == order.tolist()  # each selected index exactly once over ranks, in the order's blocks
    for rank, batches in enumerate(per_rank):  # each rank's shard keeps the global order: positions rank + jW
        shard = [i for b in batches for i, _, _ in b]
        expected = pad_and_shard(order, world, rank).tolist()
        assert shard[:len(expected)] == expected
    # the padding, as for every strategy: the order wrapped to a multiple of the world size (or a one-item shard's
    # masked duplicate), never trained
    assert len(padded) >= -m % world and set(padded) <= set(order[:max(-m % world, 1)].tolist())


def test_the_same_rule_unordered_is_shuffled(registry, monkeypatch):
    """Without `ordered` the sampler shuffles what the strategy chose (as before): the test above would fail."""
    ordered = CurriculumSampler(DIFF, "easiest_first_ordered", 0.5).select()
    monkeypatch.setattr(EasiestFirst, "ordered", False)
    shuffled = CurriculumSampler(DIFF, "easiest_first_ordered", 0.5).select()
    assert sorted(shuffled.tolist()) == sorted(ordered.tolist()) and shuffled.tolist() != ordered.tolist()


def test_warmup_before_the_first_refresh_stays_shuffled(registry):
    s = CurriculumSampler(DIFF, "hard_first", 0.5)
    s.use_all = True  # placeholder scores: the whole set, shuffled, as for every strategy
    chosen = s.select()
    assert sorted(chosen.tolist()) == list(range(len(DIFF))) and chosen.tolist() != sorted(chosen.tolist())


def test_hard_first_own_section(registry):
    config = STRATEGY_REGISTRY.entry("hard_first").config
    assert CurriculumSampler(DIFF, "hard_first", 0.5).rule.options == config()  # defaults without a section
    chosen = CurriculumSampler(DIFF, "hard_first", 0.5, options=config(skip_hardest=0.1)).select()
    # the 10 hardest (floor(0.1 * 101)) left out, then the next ceil(0.5 * 101) hardest, hardest first
    assert np.array_equal(DIFF[chosen], np.sort(DIFF)[::-1][10:10 + 51]) and len(set(chosen.tolist())) == 51


def test_hard_first_validate(registry):
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"curriculum": {"fraction": 0.95, "hard_first": {"skip_hardest": 0.1}}})
    with pytest.raises(UserError, match="skip_hardest=0.1 exceeds 1"):
        STRATEGY_REGISTRY.validate(cfg, "hard_first")
    cfg.curriculum.fraction = 0.9
    STRATEGY_REGISTRY.validate(cfg, "hard_first")


def test_hard_first_plugin_trains_hardest_first(tmp_path):
    """python train_student_rl.py run.plugins=[<a copy of hard_first.py>] curriculum.strategy=hard_first, with the
    plugin's own key: the traced selection of every epoch after the first refresh is hardest first."""
    plugin = tmp_path / "my_strategy.py"
    shutil.copy(PLUGIN, plugin)
    proc = run_script("train_student_rl.py", *TINY, "kd.alpha=0.5", "difficulty.warmup_epochs=1",
                      "difficulty.refresh_every=1", "train.epochs=3", "agent.name=bandit", f"run.plugins=[{plugin}]",
                      "curriculum.strategy=hard_first", "curriculum.fraction=0.5",
                      "curriculum.hard_first.skip_hardest=0.1", f"run.out_dir={tmp_path}", "run.name=r",
                      env={"KD_TRACE_DIR": str(tmp_path / "trace")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "r"
    assert [m["train/samples"] for m in read_metrics(run)] == [48, 24, 24]
    decisions = {d["epoch"]: d for d in map(json.loads, (tmp_path / "trace" / "decisions.rank0.jsonl").open())}
    for epoch in (1, 2):
        difficulty = np.load(run / "difficulty" / f"epoch_{epoch:03d}.npy").astype(np.float64)
        chosen = decisions[epoch]["selection"]
        hardest = np.sort(difficulty)[::-1]
        assert np.array_equal(difficulty[chosen], hardest[4:4 + 24])  # floor(0.1 * 48) skipped, then hardest first
        assert decisions[epoch]["shard"] == chosen  # one rank: trained in exactly that order
