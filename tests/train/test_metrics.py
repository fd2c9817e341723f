"""TensorBoard gets per-layer scalars and each layer's expert load as a histogram over expert ids."""
import json

import pytest

from moe_dist.train.metrics import Metrics


def test_tensorboard_per_layer_scalars_and_expert_load_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = {"loss": 2.5, "moe_layers": [1, 3], "expert_load": [[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]],
              "layer_drop_frac": [0.0, 0.125], "layer_expert_loss": [0.01, 0.02]}
    log = Metrics(str(tmp_path), total_steps=10, progress_bar=False)
    log.log(5, "train", record)
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["expert_load"] == record["expert_load"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/layer_drop_frac/layer_1", "train/layer_drop_frac/layer_3",
            "train/layer_expert_loss/layer_3"} <= set(tags["scalars"])
    assert events.Scalars("train/layer_drop_frac/layer_3")[0].value == pytest.approx(0.125)
    assert set(tags["histograms"]) == {"train/expert_load/layer_1", "train/expert_load/layer_3"}
    hist = events.Histograms("train/expert_load/layer_3")[0]
    assert hist.step == 5
    assert list(hist.histogram_value.bucket) == pytest.approx([0.1, 0.2, 0.3, 0.4])  # height: each expert's share
    assert list(hist.histogram_value.bucket_limit) == [0.5, 1.5, 2.5, 3.5]  # one bucket per expert id
