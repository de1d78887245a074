"""gan_vae: teacher.ema_decay, the experts sampled from a moving average of their generator's weights (issue 26,
section 2): the formula by hand, the average after real generator steps, every sample drawn from it, and a run
killed in a teacher phase that resumes to the uninterrupted run's numbers and averages."""
import json

import pytest
import torch
from conftest import Killed, assert_clean_error, call_main
from test_gan_vae import _args, domains  # noqa: F401 - a fixture

import gan_vae.continual as continual
from gan_vae.experts import Expert, ExpertPool, ema, ema_decay_at, update_average


@pytest.mark.parametrize("decay,updates,expected", [
    (0.999, 0, 1 / 10), (0.999, 8, 9 / 18), (0.999, 600, 601 / 610),  # the warm-up
    (0.99, 889, 890 / 899), (0.99, 890, 0.99), (0.99, 10_000, 0.99), (0.5, 0, 0.1), (0.5, 9, 0.5)])  # then the cap
def test_the_decay_warms_up_then_is_capped(decay, updates, expected):
    assert ema_decay_at(decay, updates) == pytest.approx(expected, abs=0, rel=1e-15)


def test_one_average_step_by_hand():
    out = ema(torch.tensor([2.0, -4.0]), torch.tensor([4.0, 0.0]), 0.75)
    assert out.tolist() == [2.5, -3.0]  # 0.75 * 2 + 0.25 * 4, 0.75 * -4 + 0.25 * 0


def test_the_average_takes_parameters_by_formula_and_buffers_as_they_are():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    average = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    before = {k: v.clone() for k, v in average.state_dict().items()}
    model(torch.randn(5, 2))  # moves the running statistics
    update_average(average, model, 0.25)
    for name, p in model.named_parameters():
        assert torch.equal(average.state_dict()[name], 0.25 * before[name] + 0.75 * p.detach()), name
    for name, b in model.named_buffers():
        assert torch.equal(average.state_dict()[name], b), name


def _cfg(domains, tmp_path, *extra):  # noqa: F811
    from common.config import load_config
    return load_config(continual.ContinualConfig, None, [*_args(domains, tmp_path, ["discs", "crosses"]), *extra])


def test_an_expert_samples_from_the_average_of_its_generator_steps(domains, tmp_path):  # noqa: F811
    """Two real WGAN-GP steps: the average is the formula over the generator's weights after each (decays 0.1,
    then 2/11), the replay copy and every sample come from it; with teacher.ema_decay=0 nothing is averaged."""
    cfg = _cfg(domains, tmp_path, "teacher.ema_decay=0.9")
    torch.manual_seed(0)
    pool = ExpertPool(cfg, torch.device("cpu"))
    pool.experts.append(Expert(cfg, 1, pool.device))
    expert = pool.experts[0]
    expected = {n: p.detach().clone() for n, p in expert.generator.named_parameters()}
    x_real = torch.rand(64, 1, 32, 32) * 2 - 1
    expert.unfreeze()
    for step, decay in enumerate([0.1, 2 / 11]):
        pool.step(0, step, expert, x_real, 0)
        for n, p in expert.generator.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach()
    assert expert.ema_updates == 2
    for n, p in expert.ema.named_parameters():
        assert torch.equal(p, expected[n]), n
        assert not torch.equal(p, dict(expert.generator.named_parameters())[n]), n
    for n, b in expert.generator.named_buffers():
        assert torch.equal(dict(expert.ema.named_buffers())[n], b), n
    expert.freeze()
    z = torch.randn(6, cfg.teacher.z_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(expert.sample(6, torch.Generator().manual_seed(5)), expert.ema.eval()(z))
        assert not torch.equal(expert.sample(6, torch.Generator().manual_seed(5)), expert.generator.eval()(z))
    expert.tasks.append(0)
    pool.choose(1, [{"fid": 10.0, "n_real": 3, "n_fake": 3}])  # reused: its replay copy is the average
    for n, p in pool.frozen.named_parameters():
        assert torch.equal(p, expected[n]), n
    state = expert.state_dict()
    assert state["ema_updates"] == 2 and state["ema"].keys() == expert.generator.state_dict().keys()

    plain = Expert(_cfg(domains, tmp_path), 1, torch.device("cpu"))
    assert plain.ema is None and plain.sampler is plain.generator and plain.state_dict()["ema"] is None


TINY = ("teacher.steps=4", "student.steps=4", "log.sample_every=4", "run.checkpoint_every=2", "log.every_steps=1",
        "teacher.ema_decay=0.9")


def _run(domains, out, name, *extra):  # noqa: F811
    return call_main(continual.main, [*_args(domains, out, ["discs", "crosses"]), *TINY, f"run.name={name}", *extra])


def test_a_run_killed_in_a_teacher_phase_resumes_to_the_same_averages_and_numbers(domains, tmp_path, monkeypatch):  # noqa: F811,E501
    """Killed after task 1's teacher step 3 (its last checkpoint at step 2), resumed: the experts' averages, their
    update counts and every matrix equal the uninterrupted run's; a branch may not change teacher.ema_decay."""
    whole = _run(domains, tmp_path, "whole")
    assert whole.returncode is None, whole.stderr[-3000:]
    after_step = continual.ContinualRun.after_step

    def stop_after(self, t, phase, step, steps, record):
        after_step(self, t, phase, step, steps, record)
        if (t, phase, step + 1) == (1, "teacher", 3):
            raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(continual.ContinualRun, "after_step", stop_after)
        with pytest.raises(Killed):
            _run(domains, tmp_path, "killed")
    last = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=False)
    assert last["progress"] == {"task": 1, "phase": "teacher", "step": 2}
    assert [e["ema_updates"] for e in last["experts"]] == [4, 2]
    resumed = _run(domains, tmp_path, "killed", "run.resume=auto")
    assert resumed.returncode is None, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = (torch.load(tmp_path / r / "checkpoints" / "task_1.pt", weights_only=False)["experts"]
            for r in ("whole", "killed"))
    assert [e["ema_updates"] for e in a] == [e["ema_updates"] for e in b] == [4, 4]
    for ea, eb in zip(a, b):
        for key in ("ema", "generator"):
            assert ea[key].keys() == eb[key].keys()
            assert all(torch.equal(ea[key][k], eb[key][k]) for k in ea[key]), key
    ra, rb = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("whole", "killed"))
    for key in ("teacher_fid", "student_fid", "recon_mse", "recon_fid", "task_to_expert"):
        assert ra[key] == rb[key], key
    task_0 = tmp_path / "whole" / "checkpoints" / "task_0.pt"
    branch = _run(domains, tmp_path, "branch", f"run.resume={task_0}", "teacher.ema_decay=0.5")
    assert_clean_error(branch, "teacher.ema_decay = 0.9 (this run: 0.5)")
