"""Preemption: SIGTERM (how Slurm, Kubernetes and `docker stop` end a job) and SIGINT (Ctrl-C)
stop a training run at the end of the current step, with a checkpoint when it has a run
directory, instead of losing everything since the last one. The run then exits 128 + the
signal's number (143, 130), as a process the signal had killed would, so that a scheduler
still sees a preempted job; a resume from that checkpoint continues bit for bit.

A second signal does not wait: SIGINT raises KeyboardInterrupt, SIGTERM kills the process."""
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped early on a signal; code: the process's exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class Preemption:
    """A context that turns SIGTERM and SIGINT into a flag that the loop reads after each step,
    and puts the handlers that were there back when it ends. Outside the main thread Python
    cannot install handlers: there the signals keep their usual effect."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        self.restore()                           # the second signal: at once
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        except ValueError:                       # not the main thread
            self.previous = {}
        return self

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def __exit__(self, *exc):
        self.restore()

    def agreed(self, dist):
        """Whether to stop after this step: on every rank, if any rank got a signal (torchrun
        may deliver it to some ranks a step before others; they must stop at the same step,
        or the others hang in the next step's collectives). One all-reduce a step, only when
        the run is distributed (Dist.sum is the identity otherwise)."""
        return dist.sum(float(self.signum is not None), "stop flag all-reduce") > 0

    def stopped(self, step, saved):
        """The exception that ends the run after `step`; saved: the checkpoint's path, or
        None without a run directory."""
        signum = self.signum or signal.SIGTERM   # a rank that only heard of it from another
        where = f"saved {saved}; continue with --resume" if saved else \
            "no --run-dir, so nothing was saved"
        return Stopped(f"{signal.Signals(signum).name}: stopped after step {step}; {where}",
                       128 + signum)
