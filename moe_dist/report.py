"""A run seen from its files: `moe-dist report RUN_DIR` (plots and a summary) and `moe-dist info RUN_DIR`.

    rep = report("runs/tiny")        # reads runs/tiny/metrics.jsonl; writes runs/tiny/report/*.png, summary.txt
    rep.files["loss"], rep.summary   # the PNGs by name, the text summary
    rep.plotted["expert_load_layer_1"]   # [E, records]: the array the heatmap of MoE layer 1 drew
    print(info("runs/tiny"))         # checkpoints, layout, resolved config, last validation loss

What is plotted is what the trainer logged (moe_dist.train.moe_metrics): `expert_load` [layer][expert]
(each expert's share of the assignments before drops), `layer_drop_frac`, `layer_max_load_ratio`,
`a2a_rows_received` [layer][rank] under expert parallelism, losses and tokens/s. Plots use
matplotlib's Agg canvas (no display, no pyplot state). Nothing in the package imports this module.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from moe_dist.checkpoint import list_checkpoints, load_config_dict

DEAD_SHARE = 0.1  # an expert under this fraction of its fair share 1/E over the last quarter is dead
WORST_LAYERS = 5  # layers listed in the summary's balance table


class ReportError(RuntimeError):
    """The run dir or its log cannot be read; the message names the file and the fix."""


# -- reading the log -------------------------------------------------------------------------------
def read_log(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of run_dir/metrics.jsonl, by step. A resumed run appends
    again the steps after its checkpoint: the later record of a step wins. A partial last line (a
    run killed while writing) is skipped."""
    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not run.is_dir():
        raise ReportError(f"{run}: no such run directory; pass the logging.run_dir of a run "
                          f"(`moe-dist train ... logging.run_dir={run}`)")
    if not path.is_file():
        raise ReportError(f"{path}: not found; the run writes it at its first train.log_every steps: train first, "
                          f"or pass the run's logging.run_dir")
    lines = path.read_text().splitlines()
    records: dict[tuple[str, int], dict] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            key = (r["kind"], int(r["step"]))
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines):
                continue
            raise ReportError(f"{path}:{i}: not a metrics record ({e}); delete the line or rerun the run") from None
        records[key] = r
    train = sorted((r for (kind, _), r in records.items() if kind == "train"), key=lambda r: r["step"])
    val = sorted((r for (kind, _), r in records.items() if kind == "val"), key=lambda r: r["step"])
    if not train:
        raise ReportError(f"{path}: no training records yet; a run logs one every train.log_every steps: "
                          f"wait for them, or train longer")
    return train, val


@dataclass
class Series:
    """The log as arrays: train figures [N] at `steps`, MoE figures [M, L(, E)] at `moe_steps`."""
    steps: np.ndarray
    loss: np.ndarray
    aux_loss: np.ndarray
    tokens_per_s: np.ndarray
    val_steps: np.ndarray
    val_loss: np.ndarray
    moe_layers: list[int] = field(default_factory=list)  # block index of each MoE layer
    moe_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    expert_load: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))  # [M, L, E] shares
    drop_frac: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [M, L]
    max_load_ratio: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [M, L]
    a2a_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    a2a_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))  # [K, L, ranks]

    def late(self, steps: np.ndarray) -> np.ndarray:
        """Mask of `steps` in the last quarter of the run (steps above 3/4 of the last; the last at least)."""
        mask = steps > 0.75 * float(self.steps[-1])
        if not mask.any():
            mask[-1:] = True
        return mask


def series(train: list[dict], val: list[dict]) -> Series:
    def col(rs, key):
        return np.array([float(r.get(key, np.nan)) for r in rs])

    s = Series(np.array([r["step"] for r in train]), col(train, "loss"), col(train, "aux_loss"),
               col(train, "tokens_per_s"), np.array([r["step"] for r in val]), col(val, "val_loss"))
    moe = [r for r in train if r.get("expert_load")]
    if moe:
        shape = np.shape(moe[-1]["expert_load"])  # records of another model (a reused run dir) are left out
        moe = [r for r in moe if np.shape(r["expert_load"]) == shape]
        s.moe_layers = list(moe[-1].get("moe_layers") or range(shape[0]))
        s.moe_steps = np.array([r["step"] for r in moe])
        s.expert_load = np.array([r["expert_load"] for r in moe], dtype=float)
        s.drop_frac = np.array([r.get("layer_drop_frac", [np.nan] * shape[0]) for r in moe], dtype=float)
        s.max_load_ratio = np.array([r.get("layer_max_load_ratio", [np.nan] * shape[0]) for r in moe], dtype=float)
    a2a = [r for r in train if r.get("a2a_rows_received")]
    if a2a:
        shape = np.shape(a2a[-1]["a2a_rows_received"])
        a2a = [r for r in a2a if np.shape(r["a2a_rows_received"]) == shape]
        s.a2a_steps = np.array([r["step"] for r in a2a])
        s.a2a_rows = np.array([r["a2a_rows_received"] for r in a2a], dtype=float)
    return s


def rank_ratio(rows: np.ndarray) -> np.ndarray:
    """[K, L, R] rows received -> [K, R]: each rank's rows over the mean rank's, averaged over layers."""
    return (rows / np.maximum(rows.mean(2, keepdims=True), 1e-9)).mean(1)


# -- the summary -----------------------------------------------------------------------------------
def dead_experts(s: Series) -> list[tuple[int, int, float]]:
    """(MoE layer's block, expert, mean share) of the experts under DEAD_SHARE of the fair share 1/E,
    averaged over the last quarter's records."""
    if not s.moe_layers:
        return []
    mean = s.expert_load[s.late(s.moe_steps)].mean(0)  # [L, E]
    n_experts = mean.shape[1]
    return [(s.moe_layers[l], int(e), float(mean[l, e])) for l, e in zip(*np.nonzero(mean < DEAD_SHARE / n_experts))]


def summary(s: Series, run_dir: Path) -> str:
    late = s.late(s.steps)
    q = f"steps {int(s.steps[late][0])}-{int(s.steps[-1])}"
    lines = [f"run {run_dir}: {len(s.steps)} train records up to step {int(s.steps[-1])}, "
             f"{len(s.val_steps)} validation records (metrics.jsonl)"]
    final = f"final losses: train {s.loss[-1]:.4f} (aux {s.aux_loss[-1]:.4f}) at step {int(s.steps[-1])}"
    if len(s.val_steps):
        final += f", validation {s.val_loss[-1]:.4f} at step {int(s.val_steps[-1])}"
    lines.append(final)
    if s.moe_layers:
        mlate = s.late(s.moe_steps)
        ratio, drop = np.nanmean(s.max_load_ratio[mlate], 0), np.nanmean(s.drop_frac[mlate], 0)
        order = np.argsort(-ratio)
        shown = order[:WORST_LAYERS]
        lines.append(f"balance over the last quarter ({q}), worst first: the busiest expert's tokens over the mean "
                     f"(1.00 = even) and the assignments dropped")
        lines += [f"  MoE layer {s.moe_layers[l]}: max load {ratio[l]:.2f}x, {100 * drop[l]:.1f}% dropped" for l in shown]
        if len(order) > len(shown):
            lines.append(f"  ... {len(order) - len(shown)} better-balanced layers (balance.png)")
        dead = dead_experts(s)
        n_experts = s.expert_load.shape[2]
        head = (f"dead experts (under {DEAD_SHARE:.0%} of the fair share 1/{n_experts} = {1 / n_experts:.4f} "
                f"over the last quarter)")
        if not dead:
            lines.append(f"{head}: none")
        else:
            lines.append(f"{head}: {len(dead)}")
            lines += [f"  MoE layer {b}, expert {e}: share {share:.5f} ({share * n_experts:.1%} of fair)"
                      for b, e, share in dead[:20]]
            if len(dead) > 20:
                lines.append(f"  ... {len(dead) - 20} more")
    else:
        lines.append("no per-layer expert load in the log (a dense model, or a log written before expert_load)")
    if len(s.a2a_steps):
        ratio = rank_ratio(s.a2a_rows[s.late(s.a2a_steps)]).mean(0)
        lines.append(f"all-to-all over the last quarter: the busiest rank ({int(ratio.argmax())}) receives "
                     f"{ratio.max():.2f}x the mean rows for its experts, the idlest ({int(ratio.argmin())}) {ratio.min():.2f}x")
    tps = s.tokens_per_s[late]
    if np.isfinite(tps).any():
        lines.append(f"throughput over the last quarter: {np.nanmean(tps):,.0f} tokens/s")
    return "\n".join(lines)


# -- the plots -------------------------------------------------------------------------------------
@dataclass
class Report:
    out_dir: Path
    summary: str
    files: dict[str, Path]  # plot name -> PNG
    plotted: dict[str, np.ndarray]  # the arrays drawn (heatmaps: the image's own data)


def report(run_dir: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None) -> Report:
    """Read run_dir/metrics.jsonl, write PNGs and summary.txt into out_dir (default run_dir/report)."""
    try:
        from matplotlib.figure import Figure  # Agg canvas: no display needed, no global backend switched
    except ImportError:
        raise ReportError("matplotlib is not installed; install it with `pip install matplotlib` "
                          "(it is in moe_dist's requirements)") from None
    run = Path(run_dir)
    s = series(*read_log(run))
    out = Path(out_dir) if out_dir is not None else run / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{out}: cannot create the report directory ({e.strerror}); pass another --out") from None
    files, plotted = {}, {}

    def save(name: str, fig) -> None:
        fig.savefig(out / f"{name}.png", dpi=110)
        files[name] = out / f"{name}.png"

    save("loss", _loss_figure(Figure, s))
    save("throughput", _throughput_figure(Figure, s))
    if s.moe_layers:
        save("balance", _balance_figure(Figure, s))
        for l, block in enumerate(s.moe_layers):
            fig, drawn = _heatmap_figure(Figure, s, l)
            save(f"expert_load_layer_{block}", fig)
            plotted[f"expert_load_layer_{block}"] = drawn
    if len(s.a2a_steps):
        fig, plotted["a2a_rank_ratio"] = _a2a_figure(Figure, s)
        save("a2a_imbalance", fig)
    text = summary(s, run) + f"\nplots in {out}: " + ", ".join(p.name for p in files.values())
    (out / "summary.txt").write_text(text + "\n")
    return Report(out, text, files, plotted)


def _layer_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]


def _legend(ax, n: int) -> None:
    if n <= 16:
        ax.legend(fontsize="small", ncol=max(1, (n + 7) // 8), title="MoE layer", title_fontsize="small")


def _loss_figure(Figure, s: Series):
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax, aux = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot(s.steps, s.loss, label="train (the step's batch)", color="tab:blue", lw=1.2)
    if len(s.val_steps):
        ax.plot(s.val_steps, s.val_loss, "o-", label="validation", color="tab:orange", ms=4)
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    aux.plot(s.steps, s.aux_loss, color="tab:green", lw=1.2)
    aux.set_ylabel("aux loss")
    aux.set_xlabel("step")
    aux.grid(alpha=0.3)
    return fig


def _throughput_figure(Figure, s: Series):
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(s.steps, s.tokens_per_s, "o-", ms=3, lw=1.2)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput (whole job, averaged over the steps since the previous record)")
    ax.grid(alpha=0.3)
    return fig


def _balance_figure(Figure, s: Series):
    fig = Figure(figsize=(8, 6), layout="constrained")
    ratio_ax, drop_ax = fig.subplots(2, 1, sharex=True)
    for l, (block, color) in enumerate(zip(s.moe_layers, _layer_colors(len(s.moe_layers)))):
        ratio_ax.plot(s.moe_steps, s.max_load_ratio[:, l], color=color, lw=1.2, label=str(block))
        drop_ax.plot(s.moe_steps, 100 * s.drop_frac[:, l], color=color, lw=1.2, label=str(block))
    ratio_ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ratio_ax.set_ylim(bottom=0)
    ratio_ax.set_ylabel("busiest expert / mean")
    ratio_ax.set_title("Max load ratio per MoE layer (1 = every expert got the same tokens)")
    drop_ax.set_ylabel("% assignments dropped")
    drop_ax.set_title("Dropped by capacity, per MoE layer")
    drop_ax.set_ylim(bottom=0, top=max(1.0, float(np.nanmax(100 * s.drop_frac)) * 1.1))
    drop_ax.set_xlabel("step")
    for ax in (ratio_ax, drop_ax):
        ax.grid(alpha=0.3)
    _legend(ratio_ax, len(s.moe_layers))
    return fig


def _heatmap_figure(Figure, s: Series, layer: int):
    """Expert x step image of the shares; white is the fair share 1/E, red above, blue below."""
    from matplotlib.colors import TwoSlopeNorm

    data = s.expert_load[:, layer, :].T  # [E, M]
    n_experts, steps = data.shape[0], s.moe_steps
    fair = 1.0 / n_experts
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    fig = Figure(figsize=(9, 1.2 + min(0.3 * n_experts, 8)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest", cmap="RdBu_r",
                   norm=TwoSlopeNorm(vmin=0.0, vcenter=fair, vmax=max(2 * fair, float(data.max()))),
                   extent=(steps[0] - half, steps[-1] + half, -0.5, n_experts - 0.5))
    if n_experts <= 32:
        ax.set_yticks(range(n_experts))
    ax.set_ylabel("expert")
    ax.set_xlabel("step")
    ax.set_title(f"MoE layer {s.moe_layers[layer]}: each expert's share of the assignments (before drops)")
    bar = fig.colorbar(im, ax=ax, pad=0.01)
    bar.set_ticks(sorted({0.0, fair, *np.linspace(fair, im.norm.vmax, 4)[1:]}))
    bar.ax.yaxis.set_major_formatter("{x:.3g}")
    bar.set_label(f"share (white = fair 1/{n_experts})")
    return fig, np.asarray(im.get_array())


def _a2a_figure(Figure, s: Series):
    """Top: each rank's rows over the mean rank's, averaged over layers, per record. Bottom: per MoE
    layer over the last quarter, where the average over layers could hide a layer's hot rank."""
    from matplotlib.colors import TwoSlopeNorm

    ratio = rank_ratio(s.a2a_rows)  # [K, R]
    rows = s.a2a_rows[s.late(s.a2a_steps)]  # [K', L, R]
    per_layer = (rows / np.maximum(rows.mean(2, keepdims=True), 1e-9)).mean(0)  # [L, R]
    n_layers, n_ranks = per_layer.shape
    fig = Figure(figsize=(8, 4.5 + min(0.25 * n_layers, 5)), layout="constrained")
    ax, heat = fig.subplots(2, 1, height_ratios=[2, 1 + min(0.12 * n_layers, 2)])
    for r, color in zip(range(n_ranks), _layer_colors(n_ranks)):
        ax.plot(s.a2a_steps, ratio[:, r], color=color, lw=1.2, label=f"rank {r}")
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("rows received / mean rank")
    ax.set_title("All-to-all receive imbalance: rows each rank's experts received (mean over MoE layers)")
    ax.grid(alpha=0.3)
    if n_ranks <= 16:
        ax.legend(fontsize="small", ncol=max(1, (n_ranks + 7) // 8))
    top = max(1.5, float(per_layer.max()))
    im = heat.imshow(per_layer, aspect="auto", origin="lower", interpolation="nearest", cmap="RdBu_r",
                     norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
    heat.set_xlabel("expert-parallel rank")
    heat.set_ylabel("MoE layer")
    labels = s.moe_layers if len(s.moe_layers) == n_layers else list(range(n_layers))
    if n_layers <= 24:
        heat.set_yticks(range(n_layers), [str(b) for b in labels])
    if n_ranks <= 32:
        heat.set_xticks(range(n_ranks))
    heat.set_title("Per MoE layer, over the last quarter (white = the mean rank)")
    fig.colorbar(im, ax=heat, pad=0.01).set_label("rows / mean")
    return fig, ratio


# -- info ------------------------------------------------------------------------------------------
def info(run_dir: str | os.PathLike) -> str:
    """Checkpoints (step, size, state), the layout and resolved config of the newest complete one, and
    the last validation loss of metrics.jsonl."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: no such run directory; pass the logging.run_dir of a run")
    ckpts = list_checkpoints(run)
    has_log = (run / "metrics.jsonl").is_file()
    if not ckpts and not has_log:
        raise ReportError(f"{run}: not a run directory (no checkpoints/ and no metrics.jsonl); pass the "
                          f"logging.run_dir of a run")
    lines = [f"run {run}"]
    if ckpts:
        lines.append(f"checkpoints in {run / 'checkpoints'}:")
        for c in ckpts:
            state = "latest" if c["latest"] else ""
            if c["problem"]:
                state = f"incomplete: {c['problem']}" + (" (latest points here)" if c["latest"] else "")
            lines.append(f"  {c['path'].name}  step {c['step']:>8}  {c['bytes'] / 1e6:9.1f} MB  {state}".rstrip())
    else:
        lines.append("checkpoints: none yet (checkpoint.every=0 saves only at the end of the run)")
    complete = [c for c in ckpts if not c["problem"]]
    use = next((c for c in complete if c["latest"]), complete[-1] if complete else None)
    if use is not None and use["layout"]:
        lay = use["layout"]
        lines.append(f"layout ({use['path'].name}): world {lay['world_size']} = dp {lay['dp']} x tp {lay['tp']}; "
                     f"ep {lay['ep']}")
    if has_log:
        try:
            train, val = read_log(run)
        except ReportError:
            train, val = [], []
        if val:
            lines.append(f"last validation loss: {val[-1]['val_loss']:.4f} at step {val[-1]['step']} (metrics.jsonl)")
        else:
            lines.append("last validation loss: none logged yet")
        if train:
            lines.append(f"last train record: step {train[-1]['step']}, loss {train[-1]['loss']:.4f}")
    if use is not None:
        config = yaml.safe_dump(load_config_dict(use["path"]), sort_keys=False).rstrip()
        lines.append(f"resolved config ({use['path'] / 'config.yaml'}):")
        lines += ["  " + line for line in config.splitlines()]
    return "\n".join(lines)
