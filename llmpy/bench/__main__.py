"""A run_worker subprocess (`python -m llmpy.bench JOB`): one job in, one JSON line out."""
import json
import sys

from ..backends import set_thread_env
from . import BASELINES

job = json.loads(sys.argv[1])
if job["impl"] not in BASELINES:     # a baseline keeps its user's environment
    set_thread_env()                 # before a backend loads numba and scipy

from . import worker  # noqa: E402

print(json.dumps(worker(job)))
