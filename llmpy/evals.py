"""HellaSwag accuracy on llm.c's eval file, as llm.c's EvalLoader computes it.

The file (written by `llmpy prepro hellaswag`, or llm.c's dev/data/hellaswag.py): a 256 x int32
header (magic 20240522, version 1, number of examples, longest example in bytes), then per
example a stream of uint16: 65535 (<START_EXAMPLE>), the example's size in bytes, its index,
the label, the number of completions (4), the context length and tokens, then each completion's
length and tokens. Each completion is scored by the model's mean loss over its tokens after
the shared context; the lowest wins (llm.c's acc_norm)."""
import numpy as np

from .errors import LlmpyError
from .files import HEADER_BYTES, atomic_write, make_header, read_header

EVAL_MAGIC, EVAL_VERSION = 20240522, 1
START_EXAMPLE = 65535
NUM_COMPLETIONS = 4


def progress(iterable, **kwargs):
    """A tqdm progress bar when tqdm is installed (and stderr is a terminal)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, disable=None, leave=False, **kwargs)


def write_evalfile(path, examples):
    """examples: [(label, context tokens, [completion tokens] * 4)] -> llm.c's eval file."""
    stream, longest = [], 0
    for i, (label, ctx, endings) in enumerate(examples):
        ex = [START_EXAMPLE, 0, i, label, len(endings), len(ctx), *ctx]
        for end in endings:
            ex += [len(end), *end]
        ex[1] = 2 * len(ex)
        if ex[1] >= 2 ** 16 or max(ex[2:]) >= START_EXAMPLE:
            raise LlmpyError(f"{path}: example {i} does not fit llm.c's uint16 eval format")
        longest = max(longest, ex[1])
        stream += ex
    atomic_write(path, [make_header(EVAL_MAGIC, EVAL_VERSION, len(examples), longest),
                        np.array(stream, dtype="<u2")])


def parse_example(data, pos, i):
    """The example at data[pos] (uint16 values) -> ((label, context, completions), its end).
    Raises ValueError naming what is wrong."""
    if pos + 6 > len(data):
        raise ValueError("the file ends before it")
    start, nbytes, index, label, ncomp = data[pos:pos + 5]
    if start != START_EXAMPLE or index != i:
        raise ValueError(f"expected <START_EXAMPLE> {START_EXAMPLE} and index {i}, got {start} "
                         f"and {index}")
    if ncomp != NUM_COMPLETIONS or not 0 <= label < ncomp:
        raise ValueError(f"{ncomp} completions with label {label}; expected {NUM_COMPLETIONS}")
    end = pos + nbytes // 2
    if end > len(data):
        raise ValueError(f"the file ends inside its {nbytes} bytes")
    fields, q = [], pos + 5
    for _ in range(1 + ncomp):                # the context, then each completion
        length = data[q] if q < end else 0
        if length == 0 or q + 1 + length > end:
            raise ValueError(f"a token run is empty or overflows the example's {nbytes} bytes")
        fields.append(data[q + 1:q + 1 + length])
        q += 1 + length
    if q != end:
        raise ValueError(f"{2 * (q - pos)} bytes of fields, but the example says {nbytes}")
    return (label, fields[0], fields[1:]), end


def read_evalfile(path):
    """The examples of an eval file, validated: [(label, context tokens, [completions])]."""
    h = read_header(path, EVAL_MAGIC, (EVAL_VERSION,), "eval")
    n = int(h[2])
    if n == 0:
        raise LlmpyError(f"{path}: no examples")
    data = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).tolist()
    examples, pos = [], 0
    for i in range(n):
        try:
            example, pos = parse_example(data, pos, i)
        except ValueError as e:
            raise LlmpyError(f"{path}: truncated or corrupt eval file (the header says {n} "
                             f"examples): example {i}: {e}") from None
        examples.append(example)
    if pos != len(data):
        raise LlmpyError(f"{path}: {2 * (len(data) - pos)} trailing bytes after {n} examples")
    return examples


def fill_row(inputs, targets, mask, row, ctx, end):
    """One completion as one row: inputs = context + completion; each completion token is the
    target at the position before it. A row longer than T loses its first tokens."""
    T = inputs.shape[1]
    full = ctx + end
    cut = max(0, len(full) - T)               # 0 whenever it fits, as in llm.c
    inputs[row, :len(full) - cut] = full[cut:]
    first = max(len(ctx), cut + 1)            # the first completion token with a predecessor
    targets[row, first - 1 - cut:len(full) - 1 - cut] = full[first:]
    mask[row, first - 1 - cut:len(full) - 1 - cut] = True


def hellaswag(model, examples, B, T):
    """(correct, total) over the examples, max(1, B // 4) examples per (4 * that, T) batch."""
    per_batch = max(1, B // NUM_COMPLETIONS)
    rows = per_batch * NUM_COMPLETIONS
    correct = 0
    for b in progress(range(0, len(examples), per_batch), desc="HellaSwag"):
        batch = examples[b:b + per_batch]
        inputs = np.zeros((rows, T), dtype=np.int64)      # (rows,T)
        targets = np.zeros((rows, T), dtype=np.int64)     # (rows,T)
        mask = np.zeros((rows, T), dtype=bool)            # (rows,T) the scored positions
        for e, (_, ctx, endings) in enumerate(batch):
            for c, end in enumerate(endings):
                fill_row(inputs, targets, mask, e * NUM_COMPLETIONS + c, ctx, end)
        model.forward(inputs, targets)
        losses = np.asarray(model.backend.to_host(model.acts.losses), dtype=np.float64)
        mean = (losses * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)     # (rows,)
        pred = mean.reshape(per_batch, NUM_COMPLETIONS)[:len(batch)].argmin(axis=1)
        correct += int((pred == [label for label, _, _ in batch]).sum())
    return correct, len(examples)
