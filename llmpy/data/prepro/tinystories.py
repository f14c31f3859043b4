"""TinyStories, tokenized as llm.c's dev/data/tinystories.py does: the archive's JSON shards
(data00.json ... data49.json, each a list of objects with a "story"), data00 is val, the rest
train; each shard's stories are shuffled with seed 1337 + its index within its split, stripped,
and get EOT before them. llm.c joins the train shards in the order its processes finish; here
they are joined in file order, so the output is the same on every run."""
import glob
import json
import os
import random
import shutil
import tarfile

import numpy as np

from ...errors import LlmpyError
from ...io.files import ensure_dir, file_size
from .common import encode_pieces, fetch, parallel_map, read_text, write_token_files

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"


def unpack(archive, dest):
    """Unpack a tar(.gz) into dest through a temporary name, unless dest already exists."""
    if os.path.isdir(dest):
        print(f"{dest} already exists, skipping unpacking")
        return dest
    print(f"unpacking {archive} to {dest}")
    tmp = dest + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, dest)
    except tarfile.ReadError:
        raise LlmpyError(f"{archive}: not a tar or tar.gz archive") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise LlmpyError(f"{archive}: cannot unpack: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def find_shards(source, out):
    """The sorted *.json shards of a directory, or of a tar(.gz) unpacked into out."""
    d = source if os.path.isdir(source) else unpack(source, os.path.join(out, "TinyStories_all_data"))
    shards = sorted(glob.glob(os.path.join(glob.escape(d), "*.json")))
    if len(shards) < 2:
        raise LlmpyError(f"{source}: {len(shards)} .json shards; the first is the val split and "
                         "the train split needs at least one more")
    return shards


def encode_shard(job):
    """(index within its split, path) -> (n,) uint16 tokens of the shard's stories."""
    index, path = job
    try:
        stories = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise LlmpyError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(stories, list) or not all(isinstance(s, dict) and isinstance(s.get("story"), str)
                                                for s in stories):
        raise LlmpyError(f'{path}: not a JSON list of objects with a "story" string')
    random.Random(1337 + index).shuffle(stories)
    return encode_pieces([(True, s["story"].strip()) for s in stories])


def prepro(input=None, out="tinystories", workers=None):
    """Tokenize a directory or archive of shards, or without one download the dataset first."""
    input = input or fetch(URL, out, "TinyStories_all_data.tar.gz")
    if not os.path.isdir(input) and file_size(input) == 0:
        raise LlmpyError(f"{input}: empty file")
    shards = find_shards(input, ensure_dir(out))
    files = []
    for split, paths in (("val", shards[:1]), ("train", shards[1:])):
        arrays = parallel_map(encode_shard, list(enumerate(paths)), workers,
                              f"tokenizing {split}", unit="shard")
        files.append((os.path.join(out, f"TinyStories_{split}.bin"), np.concatenate(arrays)))
    write_token_files(files)
    return [path for path, _ in files]
