"""Where a resumed run starts: its own settings, whichever way a list setting was written."""

import pytest
import yaml

from lorafit.errors import LorafitError
from lorafit.recipes.run_start import restore_run_settings
from lorafit.recipes.train_settings import TrainConfig


def _run_folder(tmp_path, **settings):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"steps": 4, **settings}))
    return run


def test_targets_written_with_commas_equal_the_same_names_as_a_list(tmp_path):
    run = _run_folder(tmp_path, targets="q_proj,v_proj")  # how runs of earlier versions wrote them
    restored, folder, _ = restore_run_settings(TrainConfig(resume=str(run), targets=["q_proj", "v_proj"]),
                                               {"resume", "targets"})
    assert folder == run and restored.targets == "q_proj,v_proj" and restored.steps == 4
    with pytest.raises(LorafitError, match=r"--targets \['k_proj'\] now, \['q_proj', 'v_proj'\] in the run"):
        restore_run_settings(TrainConfig(resume=str(run), targets=["k_proj"]), {"resume", "targets"})
