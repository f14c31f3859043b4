"""`llmpy plot RUN_DIR`: train and val loss, and HellaSwag accuracy, against the step, as a PNG."""
import json
import os

from .errors import LlmpyError


def read_log(path):
    """The JSON objects of a log.jsonl; a torn last line (a killed run) is skipped."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read the log: {e.strerror}") from None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    if not records:
        raise LlmpyError(f"{path}: no log records")
    return records


def series(records, key):
    """(steps, values) of the records that have a finite `key`."""
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
