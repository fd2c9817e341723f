"""`moe-dist export RUN_DIR OUT_DIR`: one-device model.safetensors + config.yaml from a DCP checkpoint."""
from safetensors.torch import load_file

from moe_dist.cli import main
from moe_dist.config import Config, from_dict
from moe_dist.train import Trainer
from moe_dist.model import build_model
import yaml


def test_export_writes_safetensors_that_load_into_a_fresh_model(tiny_cfg, tmp_path, capsys):
    trainer = Trainer(tiny_cfg("train.steps=2", "model.tie_embeddings=true"))
    trainer.fit()
    assert main(["export", trainer.cfg.logging.run_dir, str(tmp_path / "out")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    cfg = from_dict(Config, yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()))
    model = build_model(cfg)
    model.load_state_dict(state)
    for k, v in trainer.model.state_dict().items():
        assert (state[k] == v).all(), k
