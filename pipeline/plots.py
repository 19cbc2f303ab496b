"""The report's figures (PNG, matplotlib's Agg backend: no display needed).

convergence.png            E/N vs step per run; log10 relative error where a reference exists
energy_vs_L.png            final (or measured) E/N vs 1/L per attention kind, with reference points
factored_vs_standard.png   relative error and seconds per step side by side, per L
attention_profiles.png     the last /attention profile (factored alpha(r), standard a(r)) as an
                           L/b x L/b map per run, layer and head
attention_dependence.png   D vs step per run, layer and head
structure_factor.png       S(q) of each run's newest measurement
A figure without data says so in its middle instead of being left out.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from .aggregate import Run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in these runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def convergence(runs: list["Run"], plt):
    fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        h = r.content.history
        if not len(h.get("step", [])):
            continue
        ax.plot(h["step"], h["energy"], label=r.plot_label, lw=1)
        ref = r.row["reference_energy_per_site"]
        if ref == ref:
            ax_rel.semilogy(h["step"], np.abs((h["energy"] - ref) / ref), label=r.plot_label, lw=1)
    ax.set(xlabel="SR step", ylabel="E/N (S.S units)", title="energy per site")
    ax_rel.set(xlabel="SR step", ylabel="|relative error|", title="relative error to reference")
    for a in (ax, ax_rel):
        if a.lines:
            a.legend(fontsize=6)
        else:
            _empty(a, "history" if a is ax else "runs with a reference energy")
    return fig


def _energy(r: "Run") -> tuple[float, float]:
    if "measured_energy_per_site" in r.row:
        return r.row["measured_energy_per_site"], r.row["measured_energy_error"]
    return r.row["energy_per_site"], r.row["energy_error"]


def energy_vs_L(runs: list["Run"], plt):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model in sorted({r.row["model"] for r in runs}):
        pts = sorted((1 / r.row["L"], *_energy(r)) for r in runs if r.row["model"] == model
                     and _energy(r)[0] == _energy(r)[0])
        if pts:
            x, e, err = np.array(pts).T
            ax.errorbar(x, e, err, marker="o", ls="-", capsize=3, label=model)
    refs = sorted({(1 / r.row["L"], r.row["reference_energy_per_site"]) for r in runs
                   if r.row["reference_energy_per_site"] == r.row["reference_energy_per_site"]})
    if refs:
        ax.plot(*np.array(refs).T, "k*", ms=10, label="reference")
    if not ax.lines:
        _empty(ax, "finished runs")
    else:
        ax.set(xlabel="1/L", ylabel="E/N (S.S units)", title="energy per site vs system size")
        ax.legend()
    return fig


def factored_vs_standard(runs: list["Run"], plt):
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = sorted({r.row["L"] for r in runs})
    models = sorted({r.row["model"] for r in runs})
    width = 0.8 / max(len(models), 1)
    for k, model in enumerate(models):
        rel, sec = [], []
        for L in sizes:
            sel = [r for r in runs if r.row["L"] == L and r.row["model"] == model]
            errs = [abs(r.row.get("measured_relative_error", r.row["relative_error"])) for r in sel]
            errs = [e for e in errs if e == e]
            rel.append(np.median(errs) if errs else math.nan)
            secs = [r.row["median_seconds"] for r in sel if r.row["median_seconds"] == r.row["median_seconds"]]
            sec.append(np.median(secs) if secs else math.nan)
        x = np.arange(len(sizes)) + k * width
        ax_e.bar(x, rel, width, label=model)
        ax_t.bar(x, sec, width, label=model)
    if not runs:
        _empty(ax_e, "runs")
        _empty(ax_t, "runs")
        return fig
    for ax, label in ((ax_e, "|relative error| (median over runs)"), (ax_t, "seconds per SR step (median)")):
        ax.set_xticks(np.arange(len(sizes)) + width * (len(models) - 1) / 2, [f"L={L}" for L in sizes])
        ax.set(ylabel=label)
        ax.legend()
    if any(v > 0 for v in ax_e.get_ylim()):
        ax_e.set_yscale("log")
    ax_e.set_title("accuracy")
    ax_t.set_title("cost")
    return fig


def _grid(plt, panels: list[tuple[str, Callable]], what: str, cols: int = 4):
    if not panels:
        fig, ax = plt.subplots(figsize=(5, 3))
        _empty(ax, what)
        return fig
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, min(cols, len(panels)), figsize=(3.2 * min(cols, len(panels)),
                                                                    3.0 * rows), squeeze=False)
    for ax, (title, draw) in zip(axes.ravel(), panels):
        draw(ax, fig)
        ax.set_title(title, fontsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def _heat(data: np.ndarray, label: str, axes: tuple[str, str] = ("dx", "dy")) -> Callable:
    def draw(ax, fig):
        im = ax.imshow(data, origin="lower", cmap="viridis")
        ax.set(xlabel=axes[1], ylabel=axes[0], xticks=range(data.shape[1]), yticks=range(data.shape[0]))
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    return draw


def attention_profiles(runs: list["Run"], plt):
    panels = []
    for r in runs:
        prof = r.content.group("attention").get("profile")
        if prof is None or not len(prof):
            continue
        last = prof[-1]  # (layers, heads, n)
        m = int(round(math.sqrt(last.shape[-1])))
        name = "alpha(r)" if r.row["model"] == "vit_factored" else "a(r)"
        for layer in range(last.shape[0]):
            for head in range(last.shape[1]):
                panels.append((f"{r.plot_label}\nlayer {layer}, head {head}: {name}",
                               _heat(last[layer, head].reshape(m, m), name)))
    return _grid(plt, panels, "attention profiles")


def attention_dependence(runs: list["Run"], plt):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        a = r.content.group("attention")
        if "dependence" not in a or not len(a["step"]):
            continue
        dep = a["dependence"]
        for layer in range(dep.shape[1]):
            for head in range(dep.shape[2]):
                ax.plot(a["step"], dep[:, layer, head], marker=".", lw=1,
                        label=f"{r.plot_label} l{layer} h{head}")
    if not ax.lines:
        _empty(ax, "attention maps")
    else:
        ax.set(xlabel="SR step", ylabel="D = rms ||A(s) - <A>|| / ||<A>||",
               title="input-dependence of the attention maps (0 for factored)")
        ax.legend(fontsize=5)
    return fig


def structure_factor(runs: list["Run"], plt):
    panels = []
    for r in runs:
        meas = r.measurements
        if not meas:
            continue
        name = list(meas)[-1]
        sq = r.content.group(f"measurements/{name}")["structure_factor"]
        panels.append((f"{r.plot_label}\n{name}: S(q), q = 2 pi k / L", _heat(sq, "S(q)", ("kx", "ky"))))
    return _grid(plt, panels, "measurements")


FIGURES = {"convergence.png": convergence, "energy_vs_L.png": energy_vs_L,
           "factored_vs_standard.png": factored_vs_standard,
           "attention_profiles.png": attention_profiles,
           "attention_dependence.png": attention_dependence,
           "structure_factor.png": structure_factor}


def _distinct(runs: list["Run"]) -> None:
    """Runs that share a label (other seeds, settings) get " #1", " #2", ... in table order."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    seen: dict[str, int] = {}
    for r in runs:
        base = r.label
        if counts[base] > 1:
            seen[base] = seen.get(base, 0) + 1
            r.plot_label = f"{base} #{seen[base]}"
        else:
            r.plot_label = base


def write_all(runs: list["Run"], outdir: str) -> list[str]:
    """Write every figure into `outdir`; returns the paths."""
    _distinct(runs)
    plt = _pyplot()
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for name, make in FIGURES.items():
        fig = make(runs, plt)
        path = os.path.join(outdir, name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
