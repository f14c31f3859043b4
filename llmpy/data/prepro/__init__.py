"""`llmpy prepro ...`: raw text -> llm.c token files (tinyshakespeare, tinystories, fineweb, your
own text).
The commands' modules are imported when run, so `llmpy train` does not load tiktoken or tqdm."""


def cmd_tinyshakespeare(args):
    from .tinyshakespeare import prepro
    prepro(args.input, args.out, args.workers)


def cmd_tinystories(args):
    from .tinystories import prepro
    prepro(args.input, args.out, args.workers)


def cmd_text(args):
    from .text import prepro
    prepro(args.files, args.out, args.val_fraction, args.shard_tokens, args.name, args.workers,
           args.tokenizer)


def cmd_fineweb(args):
    from .fineweb import prepro
    prepro(args.input, args.out, args.type, args.version, args.shard_tokens, args.workers,
           args.resume)


def cmd_hellaswag(args):
    from .hellaswag import prepro
    prepro(args.input, args.out, args.split)


def _dataset(datasets, name, func, help, description):
    s = datasets.add_parser(name, help=help, description=description)
    s.add_argument("--workers", type=int, default=0,
                   help="at most N tokenizer processes (default: 0, one per core); "
                        "a corpus under about 1 MB per process is tokenized in one")

    def run(args):                  # --workers checked before any work
        from ...train.config import check_range
        check_range("workers", args.workers, least=0)
        func(args)
    s.set_defaults(func=run)
    return s


def add_parser(sub):
    """The `prepro` subcommand and its datasets, on the CLI's subparsers."""
    p = sub.add_parser("prepro", help="tokenize a dataset into llm.c token files",
                       description="Tokenize text with GPT-2 BPE into llm.c's token files "
                                   "(the same bytes llm.c's dev/data scripts write).")
    datasets = p.add_subparsers(dest="dataset", required=True)

    s = _dataset(datasets, "tinyshakespeare", cmd_tinyshakespeare,
                 "Tiny Shakespeare, as llm.c splits it",
                 "Write tiny_shakespeare_val.bin (the first 32,768 tokens) and "
                 "tiny_shakespeare_train.bin.")
    s.add_argument("--input", help="the text file (default: download llm.c's tinyshakespeare)")
    s.add_argument("--out", default="tinyshakespeare", help="output directory (default: %(default)s)")

    s = _dataset(datasets, "tinystories", cmd_tinystories, "TinyStories, as llm.c splits it",
                 "Write TinyStories_val.bin (data00.json) and TinyStories_train.bin (the other "
                 "shards).")
    s.add_argument("--input", help="a directory of the archive's .json shards, or the "
                                   "TinyStories_all_data.tar.gz archive (default: download it)")
    s.add_argument("--out", default="tinystories", help="output directory (default: %(default)s)")

    s = _dataset(datasets, "text", cmd_text, "your own .txt / .jsonl files",
                 "Each .txt file, and each record's \"text\" in a .jsonl file, is a document. "
                 "Writes NAME_val_000000.bin, NAME_train_000001.bin, ...; train on them with "
                 "--train-data 'OUT/NAME_train_*.bin'.")
    s.add_argument("files", nargs="+", help=".txt or .jsonl files, in order")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="the first F of the tokens are val (default: %(default)s)")
    s.add_argument("--shard-tokens", type=int, default=10 ** 8,
                   help="tokens per shard (default: %(default)s)")
    s.add_argument("--name", help="shard name prefix (default: the first file's name)")
    s.add_argument("--tokenizer", metavar="DIR",
                   help="a Hugging Face model directory: encode with its tokenizer.json instead "
                        "of GPT-2's BPE (uint32 token files, version 7, for a vocabulary past "
                        "65,536)")

    s = _dataset(datasets, "fineweb", cmd_fineweb, "FineWeb / FineWeb-Edu, as llm.c shards them",
                 "Write NAME_val_000000.bin (the first shard), NAME_train_000001.bin, ... from the "
                 "dataset's parquet files: the same bytes as llm.c's dev/data/fineweb.py. "
                 "Without --input, downloads the sample first (pip install 'llmpy[fineweb]').")
    s.add_argument("--type", default="classic", choices=("classic", "edu"),
                   help="HuggingFaceFW/fineweb (NAME fineweb) or fineweb-edu (NAME edu_fineweb) "
                        "(default: %(default)s)")
    s.add_argument("--version", default="10B", choices=("10B", "100B"),
                   help="the sample-10BT or sample-100BT sample (default: %(default)s)")
    s.add_argument("--shard-tokens", type=int, default=10 ** 8,
                   help="tokens per shard (default: %(default)s, llm.c's)")
    s.add_argument("--input", nargs="+",
                   help="local parquet files with a \"text\" column, or directories of them "
                        "(read in name order), instead of downloading")
    s.add_argument("--out", help="output directory (default: llm.c's, e.g. fineweb10B, "
                                 "edu_fineweb10B)")
    s.add_argument("--resume", action="store_true",
                   help="go on from the shards of an interrupted run into --out (its "
                        "NAME_resume.json), with the same arguments; without one, start")

    s = datasets.add_parser("hellaswag", help="HellaSwag, llm.c's eval file",
                            description="Write hellaswag_SPLIT.bin in llm.c's eval format (magic "
                                        "20240522), for `llmpy train --hellaswag-every N`.")
    s.add_argument("--input", help="a HellaSwag .jsonl file (default: download the split)")
    s.add_argument("--split", default="val", choices=("val", "train"),
                   help="which split (default: %(default)s)")
    s.add_argument("--out", default="hellaswag", help="output directory (default: %(default)s)")
    s.set_defaults(func=cmd_hellaswag)
