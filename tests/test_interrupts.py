"""A signal never cuts a call to an SQLite store: it is raised once the call has returned."""

from __future__ import annotations

import signal
import threading

import pytest
from mlflow import MlflowClient

from orchestration import signals
from tracking import interrupts
from tracking.store import Store, open_store


@pytest.fixture
def handlers():
    """The command's handlers installed, and everything restored after the test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signals._received.clear()
    signals.install_signal_handlers()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    signals._received.clear()
    interrupts._held = None


def test_a_signal_inside_a_store_call_is_raised_when_the_call_returns(handlers):
    reached_end = False
    with pytest.raises(KeyboardInterrupt, match="interrupted by SIGTERM"), interrupts.store_call():
        signal.raise_signal(signal.SIGTERM)
        assert interrupts.holding()
        with interrupts.store_call():  # nested blocks raise at the outermost end only
            pass
        reached_end = True
    assert reached_end
    assert not interrupts.holding()
    assert signals.received_signal() == signal.SIGTERM


def test_a_second_signal_while_one_is_held_is_raised_at_once(handlers):
    with pytest.raises(KeyboardInterrupt, match="interrupted by SIGINT"), interrupts.store_call():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        pytest.fail("the second signal should have been raised here")
    assert signals.received_signal() == signal.SIGINT


def test_outside_a_store_call_a_signal_is_raised_at_once(handlers):
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert not interrupts.holding()


def test_another_threads_store_calls_do_not_hold_the_main_threads_signals(handlers):
    inside, release = threading.Event(), threading.Event()

    def worker():
        with interrupts.store_call():
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        release.set()
        thread.join()


def test_sqlite_store_calls_are_uncut_and_their_results_unchanged(handlers, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = store.experiment_id("uncut")
    plain = MlflowClient(tracking_uri=store.uri)

    original = plain.create_run

    def create_run_signalled(*arguments, **keywords):
        signal.raise_signal(signal.SIGINT)  # arrives in the middle of the store call
        return original(*arguments, **keywords)

    store.client._client.create_run = create_run_signalled
    with pytest.raises(KeyboardInterrupt):
        store.client.create_run(experiment_id, run_name="held")
    # The call completed before the interruption was raised: its run exists.
    runs = plain.search_runs([experiment_id])
    assert [run.info.run_name for run in runs] == ["held"]


def test_http_store_clients_are_not_wrapped():
    client = MlflowClient(tracking_uri="http://127.0.0.1:9")
    assert Store("http://127.0.0.1:9", client).client is client


def test_the_wrapped_client_survives_pickling(tmp_path):
    import pickle

    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    copy = pickle.loads(pickle.dumps(store.client))
    assert [e.name for e in copy.search_experiments()] == [e.name for e in store.client.search_experiments()]
