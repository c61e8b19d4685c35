"""StopRequest: a scheduler's signal is latched while a training loop runs, and the handlers that
were there before come back afterwards (the Python API must not leave a notebook's behind)."""

from __future__ import annotations

import os
import signal

from s3delta_ds.run.signals import StopRequest, stop_note


def test_signals_are_latched_inside_and_handlers_restored_outside():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with StopRequest() as stop:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # the process lives on: latched, not acted on
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGUSR1 and stop.agreed() == signal.SIGUSR1  # the first one wins
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert "SIGUSR1 received: stopped at step 7" in stop_note(signal.SIGUSR1, 7)


def test_run_stopped_survives_pickling_with_its_fields():
    """A public exception raised inside a worker process (a pool, concurrent.futures) is pickled back
    to the caller: RunStopped's extra arguments made unpickling fail with a TypeError instead."""
    import pickle

    from s3delta_ds.errors import RunStopped

    stopped = RunStopped("stopped by SIGTERM at step 10", 15, 10)
    stopped.add_note("requeued by rank 0")
    back = pickle.loads(pickle.dumps(stopped))
    assert (str(back), back.signum, back.step) == ("stopped by SIGTERM at step 10", 15, 10)
    assert back.__notes__ == ["requeued by rank 0"]
