"""OmegaConf interpolations that cannot be resolved, and a mapping given to a list key: a clean UserError (exit 2)
naming the key, never an OmegaConf traceback."""
from __future__ import annotations

import pytest
from conftest import TINY, assert_clean_error, run_main


@pytest.mark.parametrize("args,fragments", [
    (["run.name=${run.out_dir}", "run.out_dir=${run.name}"], ["cannot be resolved", "Recursive interpolation"]),
    (["run.name=${nope.key}"], ["config key 'run.name' = ${nope.key} cannot be resolved", "'nope.key' not found"]),
    (["run.name=${oc.env:KD_TEST_SURELY_UNSET}"], ["config key 'run.name' = ${oc.env:KD_TEST_SURELY_UNSET}",
                                                   "Environment variable 'KD_TEST_SURELY_UNSET' not found"]),
    (["train.epochs=${data.name}"], ["config key 'train.epochs' = ${data.name} cannot be resolved",
                                     "could not be converted to Integer"]),
])
def test_an_interpolation_that_cannot_be_resolved_is_a_user_error(args, fragments, tmp_path):
    proc = run_main("train_student.py", *TINY, *args, f"run.out_dir={tmp_path}" if "run.out_dir" not in str(args)
                    else "log.every_steps=20")
    assert_clean_error(proc, *fragments)
    assert not any(tmp_path.iterdir())


def test_an_interpolation_that_resolves_still_works(tmp_path):
    from common.config import load_config
    from engine.schema import Config
    cfg = load_config(Config, None, [*TINY, "run.name=${oc.env:KD_TEST_SURELY_UNSET,fallback}_${train.epochs}"])
    assert cfg.run.name == "fallback_2"


def test_a_mapping_given_to_a_list_key_names_the_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  color_jitter: {a: 1}\n")
    for args in (["--config", str(config)], ["data.color_jitter={a: 1}"]):
        proc = run_main("train_student.py", *TINY, *args, f"run.out_dir={tmp_path / 'runs'}")
        assert_clean_error(proc, "'data.color_jitter' is a key, not a section, so it cannot hold keys",
                           "give it a list, e.g. data.color_jitter=[0.2, 0.2, 0.2]")
        assert "incompatible container types" not in proc.stderr
