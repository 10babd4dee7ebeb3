"""The status thread's side of a StreamingDownloader: events.jsonl and status.json, written off its lock.

The downloader builds each event record under its lock (report.event_record: the time is the event's)
and hands it to `StatusWriter.queue`, which only appends it. The status thread (`run`) wakes on a queued
record or every `interval` seconds and `flush`es: it writes the records in order, then status.json from
a fresh `progress()` (the callable takes the downloader's lock for the copy and nothing else) with the
free space measured here. stop() calls `close()` once every thread is joined: the last records and the
final status ("stopped") are written before it returns. A write that fails (a full disk, a planted file)
is logged at debug level and never stops the run.
"""
import logging
import threading
import time

from .errors import ConfigError
from .status import EventLog, write_status

logger = logging.getLogger(__name__)
P = "[StreamingDownloader]"


class StatusWriter:
    """Queued event records and status.json for one data dir. progress(): a report.Progress of now;
    status_of(progress): its DownloaderStatus (both called without the caller's lock held)."""

    def __init__(self, data_dir, progress, status_of, interval=0.5):
        self.data_dir = data_dir
        self.interval = interval
        self._progress = progress
        self._status_of = status_of
        self._log = None                    # the EventLog, once open()
        self._outbox = []                   # records not written yet, oldest first
        self._lock = threading.Lock()       # the outbox only (taken inside the downloader's lock)
        self._wake = threading.Event()
        self._flushing = threading.Lock()   # one flush at a time: the records stay in order
        self._last_write = 0.0

    @property
    def opened(self):
        return self._log is not None

    def open(self):
        self._log = EventLog(self.data_dir)

    def queue(self, record):
        """Queue one events.jsonl record (a dict with "t" and "event"); nothing is written here."""
        if self._log is None:
            return
        with self._lock:
            self._outbox.append(record)
        self._wake.set()

    def wake(self):
        self._wake.set()

    def run(self, stop):
        """The status thread: flush on every queued record and every `interval` s, until `stop` is set."""
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if stop.is_set():
                return                      # close() writes the last ones once every thread is joined
            self.flush()

    def flush(self, force=False):
        """Write the queued records, then status.json when due (a record was written, `interval` passed,
        or force)."""
        with self._flushing:
            with self._lock:
                records, self._outbox = self._outbox, []
            for rec in records:
                try:
                    self._log.write(rec.pop("event"), **rec)
                except (OSError, ValueError) as e:     # a full disk: the log loses a line, the run goes on
                    logger.debug(f"{P} could not write events.jsonl: {e}")
            if not (force or records or time.monotonic() - self._last_write >= self.interval):
                return
            try:
                write_status(self.data_dir, self._status_of(self._progress()))
                self._last_write = time.monotonic()
            except (OSError, ConfigError) as e:     # (UnsafePathError: a planted file) never crashes a run
                logger.debug(f"{P} could not write status.json: {e}")

    def close(self):
        if self._log is None:
            return
        self.flush(force=True)
        self._log.close()
