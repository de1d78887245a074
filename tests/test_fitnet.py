"""kd.method=fitnet (FitNets' feature-map hint, mdistiller's one-stage form) and kd.method=pooled_hint (the pooled
hint that was called fitnet before issue 18): the loss by hand, the regressor for the real architectures, the
cached-mode refusal, DDP, the optimiser and checkpoint, resume after SIGKILL, and old runs refused on resume."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, TINY_ONLINE, assert_clean_error, read_metrics, run_and_sigkill, run_main, run_script

import kd_methods
from common.config import load_config
from common.distributed import DistInfo
from common.errors import UserError
from engine.schema import Config, validate
from models import HintRegressor, fitnet_loss_terms, logits_and_stage_map, stage_map, stage_maps, stage_shape

FITNET = [*TINY_ONLINE, "kd.method=fitnet"]
TIME_KEYS = ("time/",)


def _cfg(*extra: str):
    cfg = load_config(Config, None, [*FITNET, *extra])
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# The loss, by hand
# ---------------------------------------------------------------------------------------------------------------
def test_fitnet_loss_hand_computed():
    # one sample, 3 classes, label 0; maps [B=1, C=2, H=1, W=2]
    z = [2.0, 0.5, -1.0]
    ce = -math.log(math.exp(z[0]) / sum(math.exp(v) for v in z))
    r_fs = [[[1.0, 2.0]], [[0.0, -1.0]]]   # the regressed student map r(F_s)
    f_t = [[[0.5, 2.0]], [[1.0, 1.0]]]     # the teacher's map F_t
    # L_hint = 1/(B C H W) sum (r(F_s) - F_t)^2 = (0.5^2 + 0^2 + 1^2 + 2^2) / 4
    hint = (0.25 + 0.0 + 1.0 + 4.0) / 4
    terms = fitnet_loss_terms(torch.tensor([z], dtype=torch.float64), torch.tensor([r_fs], dtype=torch.float64),
                              torch.tensor([f_t], dtype=torch.float64), torch.tensor([0]))
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["hint"].item() == pytest.approx(hint, rel=1e-6)
    # as kd_methods.FitNet weighs them, at its defaults (mdistiller: CE 1, feature 100): L = 1 ce + 100 hint
    method = kd_methods.FitNet(_cfg(), (2, 1, 2), (2, 1, 2))
    weighted = method.loss_terms({"logits": torch.tensor([z]), "hint": torch.tensor([r_fs])},
                                 {"feature_map": torch.tensor([f_t])}, torch.tensor([0]), 0, 4.0)
    assert {k: w for k, (w, _) in weighted.items()} == {"ce": 1.0, "hint": 100.0}
    from engine.loss import weighted_sum
    assert weighted_sum(weighted).item() == pytest.approx(ce + 100 * hint, rel=1e-6)


def test_the_mse_is_computed_in_fp32_from_low_precision_maps():
    a, b = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).half()
    terms = fitnet_loss_terms(torch.randn(2, 5).bfloat16(), a, b, torch.tensor([1, 4]))
    assert terms["hint"].dtype == terms["ce"].dtype == torch.float32
    assert terms["hint"].item() == pytest.approx(((a.float() - b.float()) ** 2).mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The regressor and the stages of the real and the test architectures
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher, student, t_shape, s_shape", [
    ("resnet152", "mobilenetv2_100", (512, 8, 8), (32, 8, 8)),   # the reference pair, stride-8 maps at 64 px
    ("resnet10t", "test_resnet", (128, 8, 8), (48, 8, 8)),       # the quickstart pair
])
def test_stage_2_maps_and_the_regressor_for_real_architectures(teacher, student, t_shape, s_shape):
    import timm
    torch.manual_seed(0)
    t = timm.create_model(teacher, pretrained=False).eval()
    s = timm.create_model(student, pretrained=False, num_classes=10)
    assert stage_shape(t, 2, 64, "teacher") == t_shape and stage_shape(s, 2, 64, "student") == s_shape
    assert s.training  # the probe restores the mode
    for model, shape in ((t, t_shape), (s, s_shape)):
        assert model.feature_info[2]["num_chs"] == shape[0] and model.feature_info[2]["reduction"] == 8
    r = HintRegressor(s_shape, t_shape)
    assert isinstance(r.conv, torch.nn.Conv2d) and r.conv.kernel_size == (1, 1)  # equal sizes: 1x1, as mdistiller
    x = torch.randn(2, 3, 64, 64)
    s.eval()
    logits, fmap = logits_and_stage_map(s, x, 2)
    assert torch.equal(logits, s(x)) and torch.equal(fmap, stage_map(s, x, 2))
    assert r(fmap).shape == (2, *t_shape) and stage_map(t, x, 2).shape == (2, *t_shape)


@pytest.mark.parametrize("name, after", [("resnet10t", ("layer3", "layer4", "fc")),
                                         ("mobilenetv2_035", ("blocks.3", "blocks.4", "blocks.5", "blocks.6", "conv_head"))])
def test_the_online_teacher_stops_after_the_hinted_stage(name, after):
    """Issue 28: the hint's teacher forward runs no layer after the hinted stage (forward hooks), and its maps equal
    those of a forward that runs every stage, bit for bit."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    ran = []
    for layer in after:
        model.get_submodule(layer).register_forward_hook(lambda *_, layer=layer: ran.append(layer))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap, maps = stage_map(model, x, 2), stage_maps(model, x, [1, 2])
        assert ran == []
        full = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        model(x)
    assert sorted(set(ran)) == sorted(after)  # the hooks do see the later layers when they run
    assert torch.equal(fmap, full[1]) and torch.equal(maps[0], full[0]) and torch.equal(maps[1], full[1])


def test_regressor_follows_the_spatial_sizes():
    for s_hw, t_hw, kind, kernel in [(16, 8, torch.nn.Conv2d, (3, 3)), (4, 8, torch.nn.ConvTranspose2d, (4, 4)),
                                     (10, 8, torch.nn.Conv2d, (3, 3)), (8, 8, torch.nn.Conv2d, (1, 1))]:
        r = HintRegressor((6, s_hw, s_hw), (5, t_hw, t_hw), relu=False)
        assert isinstance(r.conv, kind) and r.conv.kernel_size == kernel
        assert r(torch.randn(2, 6, s_hw, s_hw)).shape == (2, 5, t_hw, t_hw)
    assert (HintRegressor((6, 4, 4), (5, 4, 4))(torch.randn(2, 6, 4, 4)) >= 0).all()  # ReLU by default
    with pytest.raises(UserError, match="kd.fitnet.stage"):
        HintRegressor((6, 3, 3), (5, 8, 8))


def test_a_stage_the_models_lack_is_refused():
    from engine.trainer import Trainer
    with pytest.raises(UserError, match=r"kd.method=fitnet \(its stages: \[7\]\) reads stage 7 of the student "
                                        r"mobilenetv2_035 .* has stages 0 to 4"):
        Trainer(_cfg("kd.fitnet.stage=7"), DistInfo(), None)


# ---------------------------------------------------------------------------------------------------------------
# Refused settings
# ---------------------------------------------------------------------------------------------------------------
def test_cached_teacher_is_refused_with_the_cache_size(tmp_path):
    proc = run_main("train_student.py", *TINY, "kd.method=fitnet", "teacher.cache_views=10", f"run.out_dir={tmp_path}")
    # 50,000 x 10 x 512 x 28 x 28 x 2 bytes = 401,408,000,000 bytes
    # the engine's refusal (engine.schema.check_method_needs), with FitNet's size estimate (its cache_refusal)
    assert_clean_error(proc, "kd.method=fitnet cannot use teacher.mode=cached: it reads the teacher's feature_map, "
                             "and the teacher cache holds only logits, features.",
                       "50,000 images x K=10 x 512 x 28 x 28 x 2 bytes (fp16) = 401 GB", "100 MB of cached logits",
                       "kd.method=pooled_hint is a hint on pooled features", "Use teacher.mode=online")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before the run directory (or a cache) exists


def test_logit_standardize_is_refused(tmp_path):
    proc = run_main("train_student.py", *FITNET, "kd.logit_standardize=true", f"run.out_dir={tmp_path}")
    assert_clean_error(proc, "kd.logit_standardize=true is not read by kd.method=fitnet",
                       "kd.method=fitnet reads its own kd.fitnet.*")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Training: the regressor trains with the student (optimiser, DDP, checkpoint), and resumes exactly
# ---------------------------------------------------------------------------------------------------------------
def test_regressor_is_optimised_and_trains_in_bf16_autocast(tmp_path):
    from engine.trainer import Trainer
    trainer = Trainer(_cfg("train.amp=bf16", "train.channels_last=true", f"run.out_dir={tmp_path}"), DistInfo(), None)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    regressor = dict(trainer.method.regressor.named_parameters())
    assert set(regressor) == {"conv.weight", "bn.weight", "bn.bias"}
    assert all(id(p) in optimised for p in regressor.values())
    before = {k: v.detach().clone() for k, v in regressor.items()}
    record, _ = trainer.train_and_validate(0)
    assert math.isfinite(record["train/loss"]) and record["train/loss_hint"] > 0
    assert record["train/loss"] == pytest.approx(record["train/loss_ce"] + 100 * record["train/loss_hint"], rel=1e-5)
    assert all(not torch.equal(before[k], v) for k, v in regressor.items())


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fitnet_rank(rank: int, port: int, out_dir: str) -> None:
    """One rank of a 2-epoch fitnet run (gloo): trains, then saves its own copy of the method's state."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from common.distributed import cleanup_distributed, setup_distributed
    from engine.trainer import Trainer
    cfg = _cfg(f"run.out_dir={out_dir}")
    dist = setup_distributed("cpu")
    trainer = Trainer(cfg, dist, None)
    initial = {k: v.clone() for k, v in trainer.method.regressor.state_dict().items()}
    for epoch in range(2):
        trainer.train_and_validate(epoch)
    torch.save({"initial": initial, "trained": dict(trainer.method.regressor.named_parameters())},
               Path(out_dir) / f"rank{rank}.pt")
    cleanup_distributed()


def test_ddp_ranks_train_one_regressor(tmp_path):
    """Each rank sees its own shard; the regressor's gradients are averaged by DDP (it lives in the Distiller that
    DDP wraps), so its weights are the same on both ranks after training, and they moved from the initial ones."""
    import torch.multiprocessing as mp
    mp.start_processes(_fitnet_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, p in r0["trained"].items():
        assert torch.equal(p, r1["trained"][name]), name
    assert torch.equal(r0["initial"]["conv.weight"], r1["initial"]["conv.weight"])  # rank 0's, broadcast
    assert not torch.equal(r0["initial"]["conv.weight"], r0["trained"]["conv.weight"].detach())


def _strip_time(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in records]


def test_sigkill_after_epoch_1_then_resume_matches_the_uninterrupted_run(tmp_path):
    args = [*FITNET, "train.epochs=3", f"run.out_dir={tmp_path}"]
    env = {"OMP_NUM_THREADS": "1"}
    full = run_script("train_student.py", *args, "run.name=full", env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    assert {"regressor.conv.weight", "regressor.bn.weight", "regressor.bn.running_mean"} <= set(ckpt["method"])
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    student_params = [k for k in ckpt["model"] if not k.endswith(buffers)]
    optimised = sum(len(group["params"]) for group in ckpt["optimizer"]["param_groups"])
    assert optimised == len(student_params) + 3  # the student's parameters and the regressor's conv, BN weight, bias

    assert run_and_sigkill("train_student.py", *args, "run.name=killed", watch=tmp_path / "killed" / "metrics.jsonl",
                           after_lines=1, env=env, written=tmp_path / "killed" / "checkpoints" / "last.pt") < 3
    resumed = run_script("train_student.py", *args, "run.name=killed", "run.resume=auto", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "killed")
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert _strip_time(a) == _strip_time(b)
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("full", "killed"))
    for key in ("test/acc1", "test/acc5", "test/acc1_last", "val/acc1_best", "test/loss"):
        assert ra[key] == rb[key], key
    from safetensors.torch import load_file
    sa, sb = (load_file(tmp_path / n / "student.safetensors") for n in ("full", "killed"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ma = ckpt["method"]
    mb = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=False)["method"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


# ---------------------------------------------------------------------------------------------------------------
# A run started when `fitnet` meant the pooled hint is refused on resume, under either name
# ---------------------------------------------------------------------------------------------------------------
def test_a_pre_issue_18_fitnet_run_is_refused_on_resume(tmp_path):
    out = [*TINY, "train.epochs=2", f"run.out_dir={tmp_path}", "run.name=old"]
    proc = run_main("train_student.py", *out, "kd.method=pooled_hint", "train.epochs=1")
    assert proc.returncode in (0, None), proc.stderr[-2000:]
    run_dir = tmp_path / "old"

    def as_before_issue_18(config: dict) -> dict:  # what that run saved: kd.method=fitnet, kd.fitnet.weight
        config["kd"]["method"] = "fitnet"
        config["kd"]["fitnet"] = {"weight": config["kd"].pop("pooled_hint")["weight"]}
        return config

    (run_dir / "config.yaml").write_text(yaml.safe_dump(as_before_issue_18(yaml.safe_load(
        (run_dir / "config.yaml").read_text()))))
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["config"] = as_before_issue_18(ckpt["config"])
    torch.save(ckpt, last)
    before = (run_dir / "metrics.jsonl").read_text()
    online = [a for a in out if not a.startswith("teacher.cache_views=")]  # a cache key: refused online
    for args in ([*online, "kd.method=fitnet", "teacher.mode=online"], [*out, "kd.method=pooled_hint"]):
        proc = run_main("train_student.py", *args, "train.epochs=1", "run.resume=auto")
        assert_clean_error(proc, "trained with kd.method=fitnet as it was before issue 18",
                           "now kd.method=pooled_hint", "start a new run (another run.name)")
    assert (run_dir / "metrics.jsonl").read_text() == before
    kd_methods.check_saved_method({"kd": {"method": "fitnet", "fitnet": {"stage": 2, "hint_weight": 100.0}}})
    kd_methods.check_saved_method(None)
