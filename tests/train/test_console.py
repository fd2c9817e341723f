"""What a batch job's log shows: one line per record without the bar, a line per checkpoint, one final bar."""
import json
import re

import pytest

from moe_dist.train import Trainer
from moe_dist.train import metrics as M

LINE = re.compile(r"^step (\d+)/10 \| loss (\d+\.\d{4}) \| aux (\d+\.\d{4}) \| lr (\S+) \| ([\d,]+) tok/s \| ETA (\S+)$")


def test_lines_without_the_bar(tiny_cfg, capsys):
    cfg = tiny_cfg("train.steps=10", "checkpoint.every=5")  # log_every=5, progress_bar=false
    Trainer(cfg).fit()
    err = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in open(cfg.logging.run_dir + "/metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    lines = [LINE.match(line) for line in err if LINE.match(line)]
    assert [int(m[1]) for m in lines] == [5, 10] == [r["step"] for r in train]
    for m, r in zip(lines, train):  # the line shows the record
        assert float(m[2]) == pytest.approx(r["loss"], abs=1e-4) and float(m[3]) == pytest.approx(r["aux_loss"], abs=1e-4)
        assert float(m[4]) == pytest.approx(r["lr"], rel=1e-2)
        assert int(m[5].replace(",", "")) == round(r["tokens_per_s"])
    assert lines[-1][6] == "0s"
    saved = [line for line in err if "checkpoint" in line]
    assert len(saved) == 2 and all(re.match(rf"step {s}: checkpoint .*step_{s:08d} \(\d+\.\d MB, \d+\.\d s\)$", line)
                                   for s, line in zip((5, 10), saved))
    assert "train:" not in "".join(err)  # no bar


def test_the_final_bar_is_printed_once(tiny_cfg, capsys):
    Trainer(tiny_cfg("train.steps=10", "logging.progress_bar=true")).fit()
    err = capsys.readouterr().err
    drawn = [part for part in re.split(r"[\r\n]", err) if "10/10" in part]  # a log file shows every \r-redraw
    assert len(drawn) == 1, drawn
    assert not LINE.search(err) and "step 10: checkpoint" in err  # the bar, not the lines; the save is said


def test_pace_averages_since_the_last_line(monkeypatch):
    clock = iter([100.0, 110.0, 150.0])  # Pace() at 100 s, laps at 110 s and 150 s
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(clock))
    pace = M.Pace(step=0)
    pace.add(1.0, 1000)
    pace.add(3.0, 1000)  # a slow step: 2000 tokens in 4 s of steps, not the last step's 333/s
    assert pace.lap(step=2, end=10) == (500.0, 40.0)  # 10 s wall for 2 steps -> 8 steps left take 40 s
    pace.add(2.0, 1000)
    assert pace.lap(step=4, end=10) == (500.0, 120.0)  # a fresh average: 40 s for 2 steps, 6 left


def test_line_format():
    values = {"loss": 2.34567, "aux_loss": 0.01234, "lr": 3e-3, "tokens_per_s": 12345.6}
    assert M.train_line(20, 200, values, 3725) == "step 20/200 | loss 2.3457 | aux 0.0123 | lr 3.00e-03 | 12,346 tok/s | ETA 1h02m"
    assert [M.duration(s) for s in (7, 65, 3725)] == ["7s", "1m05s", "1h02m"]
