"""Outputs of an evaluation run: aggregated recalls, results.json, a Markdown table row, an r_mean plot."""
from pathlib import Path

from utils.common.atomic_io import atomic_write_json, atomic_write_text

from .metrics import ALL_KEYS, mean_std

TABLE_COLUMNS = ("run", "selection", "IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean", "seeds",
                 "wall time")
_TABLE_KEYS = ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean")


def aggregate(per_seed: list) -> dict:
    """{key: {"mean", "std"}} over the per-seed selected recalls (list of recall dicts)."""
    out = {}
    for key in ALL_KEYS:
        mean, std = mean_std([r[key] for r in per_seed])
        out[key] = {"mean": mean, "std": std}
    return out


def final_rise(histories: dict, key: str = "r_mean") -> dict:
    """How much the test `key` still rose over each seed's last evaluation interval.

    histories: {seed: [{"epoch", "test": recalls} or {"epoch", "loss"}, ...]}. Returns {"mean", "std"} of
    (last evaluated value - the evaluated value before it) over seeds, "relative": mean rise / mean final
    value, and "epochs": the length of that last interval (the largest over seeds); None when a seed has fewer
    than two evaluated epochs.
    """
    rises, finals, intervals = [], [], []
    for history in histories.values():
        tested = [h for h in history if "test" in h]
        if len(tested) < 2:
            return None
        rises.append(tested[-1]["test"][key] - tested[-2]["test"][key])
        finals.append(tested[-1]["test"][key])
        intervals.append(tested[-1]["epoch"] - tested[-2]["epoch"])
    if not rises:
        return None
    mean, std = mean_std(rises)
    final = sum(finals) / len(finals)
    return {"mean": mean, "std": std, "relative": mean / final if final > 0 else float("inf"),
            "epochs": max(intervals)}


def still_rising(rise: dict, threshold: float = 0.1) -> bool:
    """True when the last evaluation interval added more than `threshold` of the final value (train longer)."""
    return rise is not None and rise["mean"] > 0 and rise["relative"] > threshold


def format_duration(seconds: float) -> str:
    """Seconds as a short human string: 42s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def table_row(run_name: str, selection_label: str, summary: dict, seeds: list, wall_time: float) -> str:
    """One Markdown table row: recalls as mean ± std (std omitted for a single seed)."""
    cells = [run_name.replace("|", "/"), selection_label]
    for key in _TABLE_KEYS:
        m, s = summary[key]["mean"], summary[key]["std"]
        cells.append(f"{m:.1f} ± {s:.1f}" if len(seeds) > 1 else f"{m:.1f}")
    cells.append(",".join(str(s) for s in seeds))
    cells.append(format_duration(wall_time))
    return "| " + " | ".join(cells) + " |"


def table_header() -> str:
    """The Markdown header (two lines) of the results table."""
    return "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS)


def append_table_row(path, row: str) -> None:
    """Append `row` to a Markdown table file, writing the header first when the file is new or empty."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not text.strip():
        text = table_header() + "\n"
    elif not text.endswith("\n"):
        text += "\n"
    atomic_write_text(path, text + row + "\n")


def write_results_json(path, results: dict) -> None:
    """Write the full results record (config, per-seed histories, selection, summary, timing)."""
    atomic_write_json(path, results)


def plot_r_mean(path, histories: dict, title: str) -> None:
    """PNG of test (solid) and val (dashed) r_mean against epoch, one colour per seed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.common.atomic_io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, (seed, history) in enumerate(histories.items()):
        points = [h for h in history if "test" in h]
        colour = f"C{i % 10}"
        ax.plot([h["epoch"] for h in points], [h["test"]["r_mean"] for h in points], "-o", ms=3, color=colour,
                label=f"seed {seed} test")
        if points and "val" in points[0]:
            ax.plot([h["epoch"] for h in points], [h["val"]["r_mean"] for h in points], "--", color=colour,
                    label=f"seed {seed} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("r_mean (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
