"""The per-layer MoE record (moe_dist.train.moe_metrics) against hand-computed values."""
import pytest
import torch

from moe_dist.train.moe_metrics import MoEStepMetrics, layer_table


def _stats(load, dropped, entropy, expert_loss, **more):
    s = {"load": torch.tensor(load), "dropped": torch.tensor(dropped), "assignments": torch.tensor(sum(load)),
         "router_entropy": torch.tensor(entropy), "expert_loss": torch.tensor(expert_loss)}
    s.update({k: torch.tensor(v) for k, v in more.items()})
    return s


def test_table_and_record_by_hand():
    # two MoE layers (blocks 1 and 3) of 4 experts; layer 3 also has a z loss, layer 1 not
    micro = [_stats([4, 2, 2, 0], 1, 1.0, 0.02), _stats([1, 1, 1, 5], 3, 0.5, 0.04, z_loss=0.01)]
    table, columns = layer_table(micro)
    assert columns == ["dropped", "assignments", "router_entropy", "expert_loss", "z_loss"]
    assert table.shape == (2, 4 + 5)
    assert table[0].tolist() == pytest.approx([4, 2, 2, 0, 1, 8, 1.0, 0.02, 0.0])
    # two micro-batches (or ranks): the table is summed, means are divided by samples=2
    m = MoEStepMetrics((table + table).double(), columns, n_experts=4, samples=2, moe_layers=[1, 3])
    assert m.drop_frac() == pytest.approx((2 + 6) / (16 + 16))
    scalars = m.scalars()
    assert scalars["max_load_ratio"] == pytest.approx((8 / 4 + 10 / 4) / 2)  # max over mean, mean over layers
    assert scalars["router_entropy"] == pytest.approx(0.75)
    assert scalars["expert_loss"] == pytest.approx(0.06)  # summed over layers, as in the aux loss
    assert scalars["z_loss"] == pytest.approx(0.01)
    rec = m.record()
    assert rec["moe_layers"] == [1, 3]
    assert rec["expert_load"] == [[0.5, 0.25, 0.25, 0.0], [0.125, 0.125, 0.125, 0.625]]
    assert rec["layer_drop_frac"] == [0.125, 0.375]
    assert rec["layer_max_load_ratio"] == [2.0, 2.5]
    assert rec["layer_router_entropy"] == [1.0, 0.5]
    assert rec["layer_expert_loss"] == pytest.approx([0.02, 0.04])
    assert rec["layer_z_loss"] == pytest.approx([0.0, 0.01])


def test_record_is_short():
    load = torch.rand(3, 7).mul(1000).round()
    table = torch.cat([load, torch.tensor([[0, 7000, 1.0]] * 3)], 1)
    rec = MoEStepMetrics(table, ["dropped", "assignments", "router_entropy"], 7, 1).record()
    for row in rec["expert_load"]:
        assert sum(row) == pytest.approx(1.0, abs=1e-5)
        assert all(len(repr(x)) <= 12 for x in row)  # 6 significant digits
