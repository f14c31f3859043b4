"""What a training run prints beyond its step lines: elapsed time and ETA, the readable text of
a sample, and the summary at the end with the commands to run next."""
import importlib.util
import os
import shlex
import time

from ..errors import LlmpyError
from ..io.weights import weights_dir


def duration(seconds):
    """41.3s, 2m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def progress(elapsed, looping, step, start, steps):
    """' | 12.3s elapsed, ETA 1m10s' after `step` of `steps`: elapsed since the run began,
    the ETA from `looping`, the seconds since this process's first step (after the validation
    at step 0), which began at step `start` (a resumed run counts only the steps it ran)."""
    done = step - start
    eta = looping / done * (steps - step) if done else 0.0
    return f" | {duration(elapsed)} elapsed, ETA {duration(eta)}"


def readable(tokenizer, ids):
    """A sample's text with each <|endoftext|> as the blank line that separates documents, not
    as its literal text."""
    pieces, piece = [], []
    for i in ids:
        if i == tokenizer.eot:
            pieces.append(tokenizer.decode(piece))
            piece = []
        else:
            piece.append(i)
    pieces.append(tokenizer.decode(piece))
    return "\n\n".join(p.strip("\n") for p in pieces if p.strip())


def embedded_run_dir():
    """The embedded default's run directory: one per run, named by its start time."""
    return os.path.join("runs", "shakespeare-" + time.strftime("%Y%m%d-%H%M%S"))


def plot_path(log):
    """The plot of the JSONL log, beside it, drawn now where matplotlib is installed; else
    None. Where it cannot be drawn (a log that is not a file, such as /dev/null or a pipe, which
    reading would wait on; one with nothing to plot; a folder it cannot write to), why, in its
    place: the run itself has succeeded."""
    if not importlib.util.find_spec("matplotlib"):
        return None
    if not os.path.isfile(log):
        return f"not drawn: {log} is not a file"
    from ..plot import plot
    try:
        return plot(log, None)
    except LlmpyError as e:
        return f"not drawn: {e}"


def summary(cfg, wall, last, val_batches, checkpoint):
    """The lines printed when a run ends. last: the final step's log record; val_batches: the
    batches each validation scored; checkpoint: the path of the run's newest checkpoint, or
    None."""
    val_tokens = val_batches * cfg.batch_size * cfg.seq_len
    lines = [f"done: {cfg.steps} steps in {duration(wall)} | final train loss "
             f"{last['train_loss']:.4f}"
             + (f" | val loss {last['val_loss']:.4f} over "
                + ("the whole val split" if not cfg.val_batches else f"{val_batches} batches")
                + f" ({val_tokens:,} tokens)" if "val_loss" in last else "")]
    model = checkpoint and (weights_dir(checkpoint) or os.path.join(checkpoint, "model.bin"))
    log = cfg.log_jsonl or (cfg.run_dir and os.path.join(cfg.run_dir, "log.jsonl"))
    # `llmpy plot` takes a run directory, or the log itself where it is elsewhere
    own = cfg.run_dir and log == os.path.join(cfg.run_dir, "log.jsonl")
    plotted = shlex.quote(cfg.run_dir if own else log or "")
    if cfg.run_dir:
        lines += [f"run directory {cfg.run_dir}:",
                  f"  model  {model or '(no checkpoint: pass --checkpoint-every N)'}"]
    if cfg.save:
        lines.append(f"  model  {cfg.save}")
    if log:
        lines += [f"  log    {log}",
                  "  plot   " + (plot_path(log) or f"`llmpy plot {plotted}` draws it (needs "
                                 "matplotlib: pip install 'llmpy[plot]')")]
    target = cfg.run_dir if checkpoint else cfg.save
    commands = []
    if target:
        prompt = (' --prompt "ROMEO:"' if importlib.util.find_spec("tiktoken") else "")
        commands += [f"llmpy sample --model {shlex.quote(target)}{prompt} --tokens 200 "
                     f"--temperature 0.8 --top-k 40"
                     + ("" if prompt else "   (--prompt TEXT needs tiktoken: pip install "
                        "'llmpy[data]')")]
    if log and os.path.isfile(log):
        commands += [f"llmpy plot {plotted}"]
    if checkpoint:
        run = shlex.quote(cfg.run_dir)
        commands += [f"llmpy eval --model {run}",
                     f"llmpy train --run-dir {run} --resume --steps {2 * cfg.steps}"
                     "   (train on: the flags not given come from its config.json)"]
    return lines + (["next:"] + [f"  {c}" for c in commands] if commands else [])
