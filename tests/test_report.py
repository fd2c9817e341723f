"""`moe-dist report` and `moe-dist info` on a real short run, and on hand-written logs."""
import json

import numpy as np
import pytest
from PIL import Image

from moe_dist.cli import main
from moe_dist.report import read_log, report, series, summary

TINY = ["model.d_model=32", "model.n_layer=3", "model.moe_layer_indices=[0,2]", "model.n_head=2", "model.d_ff=64",
        "model.max_seq_len=32", "moe.n_experts=4", "moe.top_k=2", "moe.capacity_factor=1.0",
        "train.micro_batch_size=8", "train.lr=1e-2", "train.warmup_steps=2", "train.device=cpu", "train.steps=20",
        "train.log_every=5", "train.eval_every=10", "train.eval_batches=2", "checkpoint.every=10",
        "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    assert main(["train", *TINY, f"data.cache_dir={root / 'cache'}", f"logging.run_dir={root / 'run'}"]) == 0
    return root / "run"


def test_report_plots_what_the_run_logged(run_dir):
    rep = report(run_dir)
    names = ["loss", "throughput", "balance", "expert_load_layer_0", "expert_load_layer_2"]
    assert set(rep.files) == set(names)  # one process: no all-to-all plot
    for name in names:
        assert rep.files[name] == run_dir / "report" / f"{name}.png"
        with Image.open(rep.files[name]) as im:  # a real PNG that decodes
            im.load()
            assert im.format == "PNG" and im.width > 400 and im.height > 200
    # the heatmaps drew exactly the logged expert_load: [expert, record] per MoE layer, blocks 0 and 2
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20] and all(r["moe_layers"] == [0, 2] for r in train)
    for i, block in enumerate([0, 2]):
        logged = np.array([r["expert_load"][i] for r in train]).T  # [E, records]
        np.testing.assert_array_equal(rep.plotted[f"expert_load_layer_{block}"], logged)


def test_report_command(run_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["report", str(run_dir), "--out", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "elsewhere" / "expert_load_layer_2.png").is_file()
    assert "final losses: train" in out and "validation" in out and "MoE layer 2:" in out and "dead experts" in out
    assert (tmp_path / "elsewhere" / "summary.txt").read_text().strip() == out.strip()


def _write_log(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_finds_dead_experts_worst_layers_and_a2a_imbalance(tmp_path):
    """A hand-made log of 8 records: expert 3 of MoE layer 5 starves in the last quarter, layer 5 is the
    worse balanced, and rank 1 receives twice rank 0's rows."""
    records = []
    for step in range(10, 90, 10):
        late = step > 60  # 0.75 * 80: the last quarter is steps 70 and 80
        layer5 = [0.55, 0.3, 0.14, 0.01] if late else [0.25] * 4
        records.append({"step": step, "kind": "train", "loss": 3.0 - step / 100, "aux_loss": 0.01, "tokens_per_s": 1000.0,
                        "moe_layers": [1, 5], "expert_load": [[0.25] * 4, layer5],
                        "layer_drop_frac": [0.0, 0.1], "layer_max_load_ratio": [1.0, 2.2 if late else 1.0],
                        "a2a_rows_received": [[100, 200], [100, 200]]})
    records.append({"step": 80, "kind": "val", "val_loss": 2.5})
    _write_log(tmp_path, records)
    s = series(*read_log(tmp_path))
    text = summary(s, tmp_path)
    lines = text.splitlines()
    assert "final losses: train 2.2000 (aux 0.0100) at step 80, validation 2.5000 at step 80" in text
    worst = [line for line in lines if line.startswith("  MoE layer") and "max load" in line]
    assert worst == ["  MoE layer 5: max load 2.20x, 10.0% dropped", "  MoE layer 1: max load 1.00x, 0.0% dropped"]
    assert "  MoE layer 5, expert 3: share 0.01000 (4.0% of fair)" in lines  # 0.01 < 0.1 * 1/4
    assert sum(", expert " in line for line in lines) == 1  # 0.14 is above 10% of fair: alive
    assert "busiest rank (1) receives 1.33x the mean rows" in text  # 200 / 150
    rep = report(tmp_path)
    np.testing.assert_allclose(rep.plotted["a2a_rank_ratio"], [[100 / 150, 200 / 150]] * 8)
    assert "a2a_imbalance" in rep.files


def test_resumed_log_keeps_the_later_record_of_a_step(tmp_path):
    first = [{"step": s, "kind": "train", "loss": 9.0} for s in (5, 10, 15)]
    again = [{"step": s, "kind": "train", "loss": 1.0} for s in (15, 20)]  # resumed from a checkpoint at 10
    _write_log(tmp_path, first + again)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "kind": "tr')  # killed while writing
    train, _ = read_log(tmp_path)
    assert [(r["step"], r["loss"]) for r in train] == [(5, 9.0), (10, 9.0), (15, 1.0), (20, 1.0)]


@pytest.mark.parametrize("setup, expect", [
    (lambda d: None, "no such run directory"),
    (lambda d: d.mkdir(), "metrics.jsonl: not found"),
    (lambda d: d.mkdir() or (d / "metrics.jsonl").write_text(""), "metrics.jsonl: no training records yet"),
    (lambda d: d.mkdir() or (d / "metrics.jsonl").write_text('{"step": 0, "kind": "val", "val_loss": 5.5}\n'),
     "no training records yet"),
    (lambda d: d.mkdir() or (d / "metrics.jsonl").write_text('oops\n{"step": 1, "kind": "train"}\n'),
     "metrics.jsonl:1: not a metrics record"),
])
def test_report_bad_input_is_one_message_and_exit_2(tmp_path, capsys, setup, expect):
    run = tmp_path / "run"
    setup(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-dist: error: ") and expect in err and str(run) in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_info_lists_checkpoints_layout_config_and_val_loss(run_dir, capsys):
    capsys.readouterr()
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("  step_")]
    assert [r[0] for r in rows] == ["step_00000010", "step_00000020"] and [r[2] for r in rows] == ["10", "20"]
    assert rows[1][-1] == "latest" and float(rows[1][3]) > 0.01 and rows[1][4] == "MB"
    assert "layout (step_00000020): world 1 = dp 1 x tp 1; ep 1" in out
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in val if r["kind"] == "val"][-1]
    assert f"last validation loss: {last_val['val_loss']:.4f} at step 20" in out
    assert "resolved config (" in out and "    moe_layer_indices:" in out and "    n_experts: 4" in out


def test_info_marks_an_incomplete_checkpoint(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "step_00000020" / "manifest.json").unlink()  # a save that did not finish
    capsys.readouterr()
    assert main(["info", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "incomplete: no COMPLETE (the save did not finish)" in out and "(latest points here)" in out
    assert "layout (step_00000010)" in out  # the newest complete one


def test_info_of_no_run_is_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
