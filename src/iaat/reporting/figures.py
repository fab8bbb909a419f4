"""The report's figures (matplotlib, PNG and SVG), after the IAAT paper's Figs. 2-8.

Every function takes run records (see :mod:`.collect`) and a path stem, and writes ``stem.png``
and ``stem.svg``; it returns what it drew (for report.json and the tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..engine import rundir
from ..errors import ConfigError
from ..units import check_size
from .collect import RunRecord

#: CIFAR-10's class names, for the captions of the image grids.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("iaat report draws with matplotlib, which is not installed: pip install 'iaat[report]' "
                          "(or pip install matplotlib).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False, "font.size": 10,
                         "legend.fontsize": 8, "legend.frameon": False, "svg.fonttype": "none",
                         "svg.hashsalt": "iaat"})  # fixed ids inside the SVGs: a report made twice is the same
    return plt


def save(fig: Any, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` and close the figure (the same bytes for the same figure: no date)."""
    plt = pyplot()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", metadata={"Date": None} if p.suffix == ".svg" else None)
    plt.close(fig)
    return paths


_ADAPTIVE_COLORS = ("tab:red", "tab:orange", "tab:pink", "gold", "tab:cyan", "tab:olive", "magenta", "sienna")
_OTHERS = {"gairat": ("tab:green", "D"), "gair_fat": ("yellowgreen", "D"), "fat": ("tab:olive", "v"),
           "trades": ("tab:purple", "s"), "mixup_at": ("tab:brown", "P"), "mart": ("teal", "h"),
           "clean": ("tab:gray", "X")}


#: The markers a method's further runs take in turn, after the method's own.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "p", "h", "<", ">", "*")


def _shade(color: Any, i: int) -> tuple:
    """The ``i``-th shade of a colour: the colour itself, then alternately darker and lighter, further each time."""
    from matplotlib.colors import to_rgb

    rgb = np.array(to_rgb(color))
    step = min(0.22 * ((i + 1) // 2), 0.66)
    return tuple(float(c) for c in (rgb * (1 - step) if i % 2 else rgb + (1 - rgb) * step))


def _marker(base: str, i: int) -> str:
    """The ``i``-th marker of a method whose first run has ``base``."""
    start = _MARKERS.index(base) if base in _MARKERS else 0
    return _MARKERS[(start + i) % len(_MARKERS)]


def styles(records: list[RunRecord]) -> dict:
    """Colour and marker per run (by id), the same in every figure, no two legend entries alike: blues from
    mid to dark for plain PGD-AT by radius (other markers for its EMA / AWP runs), a distinct colour per
    radius-adaptive run (stars), a colour per other method with a shade and a marker per run of it; an EMA run's
    ``:raw`` point is its average's style, hollow."""
    plt = pyplot()
    out: dict = {}
    own = [r for r in records if not r.twin]
    front = sorted([r for r in own if r.method == "pgd_at" and not r.parts], key=lambda r: r.cfg.eps)
    for i, r in enumerate(front):
        out[id(r)] = {"color": plt.cm.Blues(0.5 + 0.45 * i / max(1, len(front) - 1)), "marker": "o"}
    for i, r in enumerate([r for r in own if r.method == "pgd_at" and r.parts]):
        out[id(r)] = {"color": _shade(plt.cm.Blues(0.75), i // (len(_MARKERS) - 1)),
                      "marker": _MARKERS[1 + i % (len(_MARKERS) - 1)]}
    for i, r in enumerate([r for r in own if r.adaptive]):
        turn, k = divmod(i, len(_ADAPTIVE_COLORS))
        out[id(r)] = {"color": _ADAPTIVE_COLORS[k], "marker": _marker("*", turn)}
    seen: dict = {}  # runs of each other method so far (methods without a style of their own share one count)
    for r in own:
        if id(r) not in out:
            family = r.method if r.method in _OTHERS else None
            i = seen[family] = seen.get(family, -1) + 1
            color, marker = _OTHERS.get(r.method, ("black", "^"))
            out[id(r)] = {"color": _shade(color, i // len(_MARKERS)), "marker": _marker(marker, i)}
    for r in records:
        if r.twin:
            parent = next((p for p in own if p.path == r.path), None)
            base = out[id(parent)] if parent is not None else {"color": "black", "marker": "^"}
            out[id(r)] = {**base, "markerfacecolor": "none", "markeredgecolor": base["color"],
                          "markeredgewidth": 1.5}
    _make_distinct(records, out)
    return out


def _make_distinct(records: list[RunRecord], out: dict) -> None:
    """Give a run whose colour, marker and fill an earlier run already has the next free marker (then shade): the
    rules above keep a method's own runs apart, not every method from every other."""
    from matplotlib.colors import to_rgb

    taken: set = set()
    for r in records:
        style = out[id(r)]
        base_color, base_marker = style["color"], style["marker"]
        for i in range(len(_MARKERS) * 8):
            look = (tuple(np.round(to_rgb(style["color"]), 3)), style["marker"], style.get("markerfacecolor"))
            if look not in taken:
                break
            color = _shade(base_color, (i + 1) // len(_MARKERS))
            style = {**style, "color": color, "marker": _marker(base_marker, i + 1),
                     **({"markeredgecolor": color} if "markeredgecolor" in style else {})}
        taken.add(look)
        out[id(r)] = style


#: Fig. 3's style of a run at chance level: hollow and grey (its robust accuracy means nothing).
CHANCE_STYLE = {"color": "0.55", "markerfacecolor": "none", "markeredgecolor": "0.45", "markeredgewidth": 1.2}


def point_style(r: RunRecord, style: dict) -> tuple[dict, str]:
    """A run's marker keywords in Fig. 3 and its legend label: grey, hollow and "(chance)" at chance level."""
    if r.at_chance:
        return {**style, **CHANCE_STYLE}, f"{r.name} (chance)"
    return {"markeredgecolor": "black", "markeredgewidth": 0.5, **style}, r.name


def _frontier(records: list[RunRecord], attack: str) -> list[RunRecord]:
    """The fixed-eps PGD-AT runs with a number for ``attack``: a sweep's frontier, else every plain PGD-AT run (no
    AWP, not an average); never an EMA run's second, ``:raw``, row."""
    pgd = [r for r in records if r.method == "pgd_at" and r.evaluation and not r.twin
           and r.accuracy(attack) is not None]
    marked = [r for r in pgd if r.group == "frontier"]
    return sorted(marked or [r for r in pgd if not r.parts], key=lambda r: r.cfg.eps)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy ``p`` measured on ``n`` images."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


#: The narrowest span (percentage points) of an accuracy axis: a zoom onto noise hides more than it shows.
MIN_AXIS_SPAN = 10.0


def tradeoff(records: list[RunRecord], stem: Path, attack: str, caption: str) -> list[dict]:
    """Fig. 3: clean accuracy over robust accuracy with 95 % intervals (binomial, from the images evaluated),
    the fixed-eps frontier joined by a line, labels kept apart, and axes no narrower than MIN_AXIS_SPAN."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    style_of = styles(records)
    front = _frontier(records, attack)
    if len(front) > 1:
        ax.plot([100 * r.accuracy(attack) for r in front], [100 * r.accuracy() for r in front], "--",
                color="tab:blue", alpha=0.8, lw=1.5, zorder=1.5, label="fixed-eps PGD-AT frontier")  # under the points
    points = []
    for r in records:
        if r.evaluation is None or r.accuracy(attack) is None:
            continue
        n = int(r.evaluation.get("n") or 0)
        x, y = r.accuracy(attack), r.accuracy()
        (x_lo, x_hi), (y_lo, y_hi) = wilson(x, n), wilson(y, n)
        style, label = point_style(r, style_of[id(r)])
        ax.errorbar([100 * x], [100 * y], xerr=[[100 * (x - x_lo)], [100 * (x_hi - x)]],
                    yerr=[[100 * (y - y_lo)], [100 * (y_hi - y)]], fmt="none", ecolor=style["color"], alpha=0.7,
                    lw=1, capsize=2, zorder=2)
        ax.plot([100 * x], [100 * y], linestyle="none", markersize=14 if style["marker"] == "*" else 8, label=label,
                zorder=3, **style)
        points.append({"run": r.name, "robust": x, "clean": y, "n": n, "robust_interval": [x_lo, x_hi],
                       "clean_interval": [y_lo, y_hi], "at_chance": r.at_chance, "labelled": r.group != "grid"})
    _keep_span(ax, [100 * v for p in points for v in p["robust_interval"]],
               [100 * v for p in points for v in p["clean_interval"]])
    _place_labels(ax, [(100 * p["robust"], 100 * p["clean"], p["run"]) for p in points if p["labelled"]])
    ax.set_xlabel(f"robust accuracy (%), {caption}")
    ax.set_ylabel("clean accuracy (%)")
    ax.set_title("Accuracy / robustness tradeoff (bars: 95 % intervals)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save(fig, stem)
    return [{k: v for k, v in p.items() if k != "labelled"} for p in points]


def _keep_span(ax: Any, xs: list, ys: list) -> None:
    """Axis limits around the values, each at least MIN_AXIS_SPAN wide and inside [0, 100]."""
    for values, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        if not values:
            continue
        lo, hi = min(values), max(values)
        pad = max((MIN_AXIS_SPAN - (hi - lo)) / 2, 0.0) + 0.08 * max(hi - lo, MIN_AXIS_SPAN)
        lo, hi = max(0.0, lo - pad), min(100.0, hi + pad)
        setter(lo, hi)


def _place_labels(ax: Any, points: list) -> None:
    """Each point's label at the first of a few offsets where it overlaps no label placed before it and no
    point (in display coordinates); points that coincide get their labels stacked."""
    fig = ax.figure
    fig.canvas.draw()  # the final axis limits, so display coordinates hold
    to_px = ax.transData.transform
    markers = [to_px((x, y)) for x, y, _ in points]
    taken: list = []
    offsets = [(7, 4), (7, -12), (-7, 4), (-7, -12), (7, 16), (7, -24), (-7, 16), (-7, -24), (7, 28), (-7, 28),
               (7, -36), (-7, -36)]
    scale = fig.dpi / 72  # display pixels per point
    for (x, y, name), (px, py) in zip(points, markers):
        width, height = (3.9 * len(name) + 2) * scale, 9 * scale  # a 7-point font
        for dx, dy in offsets:
            left = px + dx * scale if dx > 0 else px + dx * scale - width
            box = (left, py + dy * scale, left + width, py + dy * scale + height)
            clear = all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in taken)
            hits_point = any(box[0] - 3 < mx < box[2] + 3 and box[1] - 3 < my < box[3] + 3 for mx, my in markers)
            if clear and not hits_point:
                break
        taken.append(box)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, color="0.25",
                    ha="left" if dx > 0 else "right", zorder=5)


def accuracy_over_eps(records: list[RunRecord], stem: Path) -> list[dict]:
    """Fig. 4: accuracy over the test radius (the evaluation's eps sweep), one line per run (grid runs left out).
    Nothing is written when no evaluation has an eps sweep (returns [])."""
    shown = [r for r in records if r.group != "grid"] or records
    with_curve = [(r, r.evaluation["curves"]["eps"]) for r in shown
                  if ((r.evaluation or {}).get("curves") or {}).get("eps")]
    if not with_curve:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    style_of = styles(records)
    curves = []
    for r, curve in with_curve:
        xs = [p["eps"] * 255 for p in curve["points"]]
        ys = [100 * p["accuracy"] for p in curve["points"]]
        style = style_of[id(r)]
        ax.plot(xs, ys, "-", marker=style["marker"], color=style["color"], markersize=5,
                markerfacecolor=style.get("markerfacecolor", style["color"]), lw=2.2 if r.adaptive else 1.4,
                label=r.name)
        curves.append({"run": r.name, "eps": [p["eps"] for p in curve["points"]],
                       "accuracy": [p["accuracy"] for p in curve["points"]], "attack": curve.get("attack")})
    ax.set_xlabel("test radius ε (pixel units, /255)")
    ax.set_ylabel(f"accuracy under {curves[0]['attack'] or 'PGD'} (%)")
    ax.set_title("Robust accuracy over the test radius")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save(fig, stem)
    return curves


def pick_trajectories(stack: np.ndarray, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` samples with *different* trajectories (rows of ``stack``: epochs × samples), spread over the
    final radii; many samples share one trajectory (e.g. all that were misclassified from the start), which would
    draw one line over another. Returns ``(sample indices, how many samples share each one's trajectory)``."""
    _, first, counts = np.unique(stack.T, axis=0, return_index=True, return_counts=True)
    distinct = first[np.argsort(stack[-1, first], kind="stable")]  # one sample per trajectory, by final radius
    share = dict(zip(first.tolist(), counts.tolist()))
    positions = np.unique(np.linspace(0, len(distinct) - 1, min(k, len(distinct))).round().astype(int))
    chosen = distinct[positions]
    return chosen, np.array([share[i] for i in chosen.tolist()])


def trajectory_label(position: int, final: float, count: int) -> str:
    """Fig. 7's legend entry of one trajectory: its sample's position in the training set, its final radius (pixel
    units, two decimals: IAAT's radii move in steps of γ·β, often below 0.1/255) and how many samples share it."""
    shared = f" (same as {count - 1} other{'s' if count > 2 else ''})" if count > 1 else ""
    return f"training position {position}: {final:.2f}/255{shared}"


def radius_over_epochs(record: RunRecord, stem: Path, k: int = 8) -> dict:
    """Fig. 7: the mean radius per epoch with quantile bands, and the trajectories of a few samples."""
    plt = pyplot()
    rows = [m for m in record.metrics if "radius_mean" in m]
    # each panel its own y axis: one outlying sample would squash the mean and its bands
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    epochs = [m["epoch"] for m in rows]
    pixels = lambda key: [m[key] * 255 for m in rows]  # noqa: E731 -- metrics hold [0, 1] units
    if rows:
        if all("radius_q10" in m for m in rows):
            left.fill_between(epochs, pixels("radius_q10"), pixels("radius_q90"), color="tab:red", alpha=0.12,
                              label="10-90% of samples")
            left.fill_between(epochs, pixels("radius_q25"), pixels("radius_q75"), color="tab:red", alpha=0.25,
                              label="25-75%")
        left.plot(epochs, pixels("radius_mean"), "-o", color="tab:red", markersize=4, label="mean")
        warmup = record.params.get("warmup_epochs", 0)
        if warmup:
            left.axvspan(0.5, warmup + 0.5, color="0.85", alpha=0.5,
                         label=f"warmup ({warmup} epoch{'s' if warmup != 1 else ''})")
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("epoch")
    left.set_ylabel("radius ε_i (pixel units, /255)")
    left.set_title(f"{record.name}: radii over training")
    left.legend(loc="best")
    chosen: list = []
    if record.radii:
        ep = sorted(record.radii)
        stack = np.stack([record.radii_at(e) for e in ep]) * 255  # (epochs, samples)
        picked, shared = pick_trajectories(stack, k)
        chosen = picked.tolist()
        cmap = plt.cm.viridis
        for j, (i, count) in enumerate(zip(chosen, shared.tolist())):
            right.plot(ep, stack[:, i], "-", color=cmap(j / max(1, len(chosen) - 1)), lw=1.5, marker=".",
                       label=trajectory_label(i, stack[-1, i], count))
        right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), title="final radius")
    right.set_xlabel("epoch")
    right.set_ylabel("radius ε_i (pixel units, /255)")
    right.set_title(f"{len(chosen)} distinct trajectories (spread over the final radii)")
    save(fig, stem)
    return {"run": record.name, "epochs": epochs, "trajectories": chosen}


#: Up to this many distinct radii, Fig. 8 draws one bar per radius: IAAT's radii move in steps of γ·β (e.g.
#: 0.19/255), which equal-width bins would merge.
MAX_DISTINCT_BARS = 40
#: When a panel's largest bar is more than this many times the median of its other bars, Fig. 8 counts on a log axis,
#: so that a spike (e.g. every misclassified sample at radius 0) does not flatten the rest.
LOG_RATIO = 20


def histogram_layout(values: list[np.ndarray], bins: int = 30) -> dict:
    """The bars Fig. 8 draws for each panel's radii (pixel units), shared by the panels: one bar per distinct radius
    (to 1e-4/255) when there are at most MAX_DISTINCT_BARS (``centers``, ``width``), else ``bins`` equal bins over
    [min, max] (``edges``); ``counts`` per panel, and ``log`` when a largest bar dwarfs the rest."""
    rounded = [np.round(np.asarray(v, dtype=float), 4) for v in values]
    distinct = np.unique(np.concatenate(rounded))
    if len(distinct) <= MAX_DISTINCT_BARS:
        span = float(distinct[-1] - distinct[0])
        gap = float(np.diff(distinct).min()) if len(distinct) > 1 else 1.0
        width = max(0.8 * gap, span / 150)  # no thinner than a line, however close two radii are
        layout: dict = {"centers": distinct, "width": width,
                        "counts": [np.array([int((v == d).sum()) for d in distinct]) for v in rounded]}
    else:
        edges = np.linspace(distinct[0], distinct[-1], bins + 1)
        layout = {"edges": edges, "counts": [np.histogram(v, bins=edges)[0] for v in rounded]}
    layout["log"] = any(_dwarfs(c) for c in layout["counts"])
    return layout


def _dwarfs(counts: np.ndarray) -> bool:
    """The largest bar is more than LOG_RATIO times the median of the other (non-empty) bars."""
    top = np.sort(counts[counts > 0])[::-1]
    return len(top) > 1 and top[0] > LOG_RATIO * float(np.median(top[1:]))


def radius_histograms(record: RunRecord, stem: Path, panels: int = 4) -> dict:
    """Fig. 8: histograms of the radii at a few epochs, on shared axes (see :func:`histogram_layout`)."""
    plt = pyplot()
    warmup = record.params.get("warmup_epochs", 0)
    ep = [e for e in sorted(record.radii) if e >= warmup] or sorted(record.radii)  # from the last warmup epoch on
    pick = sorted({ep[i] for i in np.linspace(0, len(ep) - 1, min(panels, len(ep))).round().astype(int)})
    fig, axes = plt.subplots(1, len(pick), figsize=(3.2 * len(pick), 3.2), sharex=True, sharey=True, squeeze=False)
    values = [record.radii_at(e) * 255 for e in pick]
    layout = histogram_layout(values)
    for ax, e, v, counts in zip(axes[0], pick, values, layout["counts"]):
        if "centers" in layout:
            ax.bar(layout["centers"], counts, width=layout["width"], color="tab:red", alpha=0.8)
        else:
            edges = layout["edges"]
            ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:red", alpha=0.8,
                   edgecolor="white", linewidth=0.4)
        ax.axvline(v.mean(), color="black", lw=1, ls="--")
        ax.set_title(f"epoch {e}: mean {v.mean():.2f}/255 (dashed)", fontsize=9)
        ax.set_xlabel("radius (pixel units, /255)")
    if "centers" in layout and len(layout["centers"]) == 1:  # one radius: a bar of some width around it
        axes[0][0].set_xlim(layout["centers"][0] - 1, layout["centers"][0] + 1)
    if layout["log"]:
        axes[0][0].set_yscale("log")
    axes[0][0].set_ylabel("training samples" + (" (log scale)" if layout["log"] else ""))
    fig.suptitle(f"{record.name}: distribution of the per-sample radii"
                 + (", one bar per radius" if "centers" in layout else ""), y=1.03)
    save(fig, stem)
    # report.json holds sizes in [0, 1] units, like every JSON file of the project (the figure's axis: /255)
    bars = ({"centers": (layout["centers"] / 255).tolist(), "width": layout["width"] / 255} if "centers" in layout
            else {"edges": (layout["edges"] / 255).tolist()})
    return {"run": record.name, "epochs": pick, **bars, "counts": [c.tolist() for c in layout["counts"]],
            "log_y": layout["log"]}


def image_grid(images: np.ndarray, adversarial: np.ndarray, captions: list[str], adv_captions: list[str],
               title: str, stem: Path) -> None:
    """Figs. 2, 5, 6: each image above its perturbed version, captions under each."""
    plt = pyplot()
    k = len(images)
    fig, axes = plt.subplots(2, k, figsize=(1.45 * k, 4.0), squeeze=False)
    for j in range(k):
        for row, (batch, text) in enumerate(((images, captions), (adversarial, adv_captions))):
            ax = axes[row][j]
            img = np.transpose(batch[j], (1, 2, 0))
            ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_xlabel(text[j], fontsize=7)
    axes[0][0].set_ylabel("image", fontsize=8)
    axes[1][0].set_ylabel("perturbed", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, stem)


def class_name(label: int, dataset: str) -> str:
    return CIFAR10_CLASSES[label] if dataset == "cifar10" and 0 <= label < 10 else str(label)


def grid_weights(record: RunRecord) -> str:
    """The weights (load_run's ``weights=``) the image grids use: those the run is reported with, the average of
    an EMA run (unless its evaluation is of its raw weights), else the trained ones."""
    return "ema" if record.weights == "ema" else "raw"


def prediction_caption(clean: int, adversarial: int, dataset: str) -> str:
    """Under a perturbed image: the prediction on the clean image and on the perturbed one, so that a sample
    misclassified when clean is not blamed on the attack."""
    return f"clean: {class_name(clean, dataset)}\nadv: {class_name(adversarial, dataset)}"


def smallest_largest(record: RunRecord, stem: Path, data_dir: Optional[str], image_eps: Optional[float], device: str,
                     k: int = 8) -> Optional[dict]:
    """The training images with the smallest and the largest final radii, each beside a PGD-20 perturbation
    at ``image_eps`` ([0, 1] units) of the final model, with radius and (adversarial) prediction printed."""
    import torch

    from ..attacks import pgd
    from ..data import load_dataset, to_unit
    from ..engine.runs import load_run
    from ..engine.setup import resolve_device

    final = record.radii_at(max(record.radii))
    train_idx = rundir.read_train_indices(record.path)  # a CheckpointError: the report goes on without grids
    if len(train_idx) != len(final):
        raise ConfigError(f"{record.path}: the radii hold {len(final)} samples but data_split.npz {len(train_idx)}.")
    order = np.argsort(final, kind="stable")
    groups = {"smallest": order[:k], "largest": order[::-1][:k]}
    cfg = record.cfg
    norm = cfg.attack.norm
    if image_eps is None:  # large enough to see: 16/255 under L-inf, twice the training radius under L2
        image_eps = 16 / 255 if norm == "linf" else 2 * cfg.eps
    check_size(image_eps, "--image-eps", norm=norm)
    splits = load_dataset(cfg.data.dataset, data_dir or cfg.data.data_dir, False, image_size=cfg.data.image_size,
                          resize=cfg.data.resize)
    dev = resolve_device(device)
    weights = grid_weights(record)
    model, _, _, _ = load_run(record.path, dev, weights=weights)
    named = "EMA weights" if weights == "ema" else "trained weights"
    drawn: dict = {"weights": "EMA" if weights == "ema" else "trained", "eps": image_eps, "norm": norm}
    for which, rows in groups.items():
        idx = torch.as_tensor(train_idx[rows], dtype=torch.long)
        subset = splits.train.subset(idx)
        x = to_unit(subset.x[:], dev)  # image folders: a lazy set of files, read here
        y = subset.y.to(dev)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        res = pgd(model, x, y, image_eps, steps=20, step_size=image_eps / 4, norm=norm)
        torch.random.set_rng_state(gen_state)
        with torch.no_grad():
            clean_pred = model(x).argmax(1).cpu().tolist()
            pred = model(res.x_adv).argmax(1).cpu().tolist()
        labels = y.cpu().tolist()
        captions = [f"{class_name(c, cfg.data.dataset)}\n{final[r] * 255:.2f}/255" for c, r in zip(labels, rows)]
        adv_captions = [prediction_caption(c, a, cfg.data.dataset) for c, a in zip(clean_pred, pred)]
        title = (f"{record.name} ({named}): the {k} training images with the {which} final radii (class, radius)"
                 f"\nbelow: PGD-20 at {image_eps * 255:g}/255 ({norm}), with the predictions on the clean and the "
                 f"perturbed image")
        image_grid(x.cpu().numpy(), res.x_adv.detach().cpu().numpy(), captions, adv_captions, title,
                   stem.with_name(f"{stem.name}_{which}"))
        edge = final[rows[-1]]  # ties at the edge of the group: which of them are shown is training-set order
        drawn[which] = {"train_positions": rows.tolist(), "radii": final[rows].tolist(), "labels": labels,
                        "clean_predictions": clean_pred, "adversarial_predictions": pred,
                        "tied_at_edge": int((final == edge).sum())}
    return {"run": record.name, **drawn}
