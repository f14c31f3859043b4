"""`llmpy plot RUN_DIR`: train and val loss, and HellaSwag accuracy, against the step, as a PNG."""
import json
import os

from .errors import LlmpyError

PLOTTED = ("train_loss", "val_loss", "hellaswag_acc")


def is_number(x):
    return type(x) in (int, float)     # not a bool, a string or a list


def read_log(path):
    """The records of a log.jsonl, checked: objects with a numeric "step" and numbers (or null)
    for what is plotted. A line that is not JSON, as a killed run's torn last line, is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read the log: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LlmpyError(f"{path}: not a log.jsonl (not UTF-8 text)") from None
    records = []
    for i, line in enumerate(lines):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict):
            raise LlmpyError(f"{path}: line {i + 1} is not a JSON object")
        if not is_number(r.get("step")):
            raise LlmpyError(f'{path}: line {i + 1}: "step" is missing or not a number')
        for k in PLOTTED:
            if r.get(k) is not None and not is_number(r[k]):
                raise LlmpyError(f"{path}: line {i + 1}: {k} is not a number")
        records.append(r)
    if not any(r.get(k) is not None for r in records for k in PLOTTED):
        raise LlmpyError(f"{path}: no losses to plot")
    return records


def series(records, key):
    """(steps, values) of the records that have `key`."""
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def plot(run_dir, out=None):
    """Write the PNG (default RUN_DIR/plot.png); run_dir may also be a log .jsonl itself."""
    log = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, "log.jsonl")
    out = out or os.path.join(os.path.dirname(log), "plot.png")
    records = read_log(log)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlmpyError("plotting needs matplotlib: pip install 'llmpy[plot]'") from None
    hella = series(records, "hellaswag_acc")
    fig, axes = plt.subplots(1, 2 if hella[0] else 1, figsize=(12 if hella[0] else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    ax.plot(*series(records, "train_loss"), label="train", lw=0.8)
    ax.plot(*series(records, "val_loss"), "o-", label="val", ms=3)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    if hella[0]:
        ax = axes[0][1]
        ax.plot(*hella, "o-", ms=3, color="C2")
        ax.set(xlabel="step", ylabel="accuracy", title="HellaSwag")
    fig.tight_layout()
    tmp = out + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    except OSError as e:
        raise LlmpyError(f"{out}: cannot write: {e.strerror}") from None
    finally:
        plt.close(fig)
    print(f"wrote {out}")
    return out
