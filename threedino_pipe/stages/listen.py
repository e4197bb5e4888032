"""``3dino listen``: a DICOM storage node that predicts each study once it is quiet and sends the results on.

The node's folder (docs/listen.md): ``incoming/<study key>/<SOPInstanceUID>.dcm`` (every received
file, written before it is acknowledged), ``results/<study key>/`` (one ``3dino predict`` output
folder per study and cycle, with the worker's ``predict.log``), ``journal.jsonl`` (every event,
:mod:`threedino_pipe.artifacts.journal`), ``listen.log`` (plain progress lines) and the private
``.study_keys.json``. A study is predicted by a worker process (``3dino predict``), one at a time,
so a crash in one study cannot take the node down; a study that fails is journalled ``failed`` and
the node goes on. On start the journal is replayed (:mod:`threedino_pipe.inference.listen_node`):
nothing received is lost, nothing acknowledged is sent again. SIGINT and SIGTERM stop it cleanly
(the study being predicted, if any, is predicted again after a restart).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from threedino_pipe.artifacts import StudyKeys
from threedino_pipe.artifacts.journal import CRASH_HOOK, Journal, JournalLine, read_journal
from threedino_pipe.dicom.storage_scp import StorageServer
from threedino_pipe.inference.case_outputs import parse_formats
from threedino_pipe.inference.listen_node import (
    INCOMING,
    RESULTS,
    WORKER_LOG,
    Outcome,
    StudyState,
    apply,
    collect,
    count_files,
    remove_partial_files,
    worker_command,
)
from threedino_pipe.inference.pacs_cases import PacsLink
from threedino_pipe.runtime.errors import UserError
from threedino_pipe.runtime.locks import TargetLock

log = logging.getLogger(__name__)

LOG_FILE = "listen.log"
TICK_S = 0.25
MAX_RETRY_WAIT_S = 3600.0
STOP_WORKER_S = 20.0


@dataclass
class NodeOptions:
    """How the node behaves: its formats, the worker's ``3dino predict`` options, quiet and retry times (s)."""

    formats: tuple[str, ...]
    predict_args: list[str]
    quiet_seconds: float = 120.0
    retry_seconds: float = 60.0
    link: PacsLink | None = None


def run(output_dir: Path, models: Sequence[Path], *, ae_title: str = "THREEDINO", port: int = 11112,
        bind: str = "127.0.0.1", allow_ae: Sequence[str] = (), quiet_seconds: float = 120.0,
        send_to: Sequence[str] = (), retry_seconds: float = 60.0, checkpoint: str = "best", overlap: float = 0.5,
        tta: bool = False, window_batch_size: int = 1, device: str = "auto", precision: str = "auto",
        output_formats: Sequence[str] | None = None, series_rules: Sequence[str] = (), min_slices: int = 10,
        save_probabilities: bool = False, skip: bool = True, coarse: bool = False) -> int:
    """Run the node in ``output_dir`` until SIGINT or SIGTERM; returns the exit code (0).

    ``quiet_seconds``: a study is predicted once no file came for it this long; ``retry_seconds``: the
    wait after a failed send round (doubling each round, at most an hour). The model options are
    those of ``3dino predict`` (``output_formats`` default: dicom-seg).

    Raises:
        UserError: bad options, a missing model, a destination that cannot be reached, a port in use,
            or another node in the folder.
    """
    if quiet_seconds <= 0 or retry_seconds <= 0:
        raise UserError("--quiet-seconds and --retry-seconds must be above 0", fix="pass e.g. --quiet-seconds 120")
    if not models:
        raise UserError("no model given", fix="pass -m RUN_FOLDER_OR_ZIP (repeat for several folds)")
    for model in models:
        if not Path(model).exists():
            raise UserError("model not found", file=model, fix="pass a finetune run folder or model zip")
    formats = parse_formats(list(output_formats or ["dicom-seg"]), dicom_input=True)
    link = PacsLink.from_options(input_given=True, from_pacs=None, studies=[], send_to=list(send_to),
                                 calling_ae=ae_title)
    if link is not None:
        link.check_formats(formats)
        link.check()  # a destination that refuses us is a configuration error: refuse to start
    args = [a for m in models for a in ("-m", str(Path(m).resolve()))]
    args += ["--checkpoint", checkpoint, "--overlap", str(overlap), "--window-batch-size", str(window_batch_size),
             "--device", device, "--precision", precision, "--output-format", ",".join(formats),
             "--min-slices", str(min_slices), *(a for r in series_rules for a in ("--series-rule", r))]
    args += ["--tta"] if tta else []
    args += ["--save-probabilities"] if save_probabilities else []
    args += ["--skip" if skip else "--no-skip", "--coarse" if coarse else "--no-coarse"]
    options = NodeOptions(formats, args, quiet_seconds, retry_seconds, link)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    with TargetLock(output_dir, "listening node folder"):
        handler = logging.FileHandler(output_dir / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("threedino_pipe").addHandler(handler)
        try:
            node = Node(output_dir, options)
            return node.serve(StorageServer(ae_title, bind, port, place=node.place,
                                            on_association_end=node.on_association_end, allowed_callers=allow_ae))
        finally:
            logging.getLogger("threedino_pipe").removeHandler(handler)
            handler.close()


@dataclass
class Worker:
    """The prediction running now: its study, process, results folder and start (monotonic s)."""

    state: StudyState
    process: subprocess.Popen
    results: Path
    started: float


@dataclass
class Node:
    """The node's state: studies (from the journal), arrivals, the worker; the SCP calls :meth:`place`."""

    folder: Path
    options: NodeOptions
    states: dict[str, StudyState] = field(default_factory=dict)
    arrivals: dict[str, float] = field(default_factory=dict)  # study key -> monotonic time of its last file
    worker: Worker | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.incoming, self.results = self.folder / INCOMING, self.folder / RESULTS
        self.lock = threading.RLock()
        self.keys = StudyKeys.in_output(self.folder)
        path = JournalLine.in_folder(self.folder)
        for line in read_journal(path):
            apply(self.states, line)
        self.journal = Journal(path)
        self.sender = self.options.link.sender(path, self.options.formats) if self.options.link else None
        self._seq = 0

    def record(self, event: str, key: str, **fields) -> StudyState:
        """Journal one event of study ``key`` and apply it to the study's state."""
        with self.lock:
            state = apply(self.states, self.journal.add(event, key, **fields))
            if event == "quiet":
                self._seq += 1
                state.queued_seq = self._seq
            return state

    # --- the storage SCP's callbacks (its threads) --------------------------------------------
    def place(self, study_uid: str) -> Path:
        """The folder of a study's received files (its key recorded in ``.study_keys.json`` first)."""
        with self.lock:
            known = len(self.keys.studies)
            key = self.keys.key_of(study_uid)
            if len(self.keys.studies) != known:
                self.keys.write(StudyKeys.in_folder(self.folder))
            self.arrivals[key] = time.monotonic()
        return self.incoming / key

    def on_association_end(self, calling_ae: str, counts: dict[str, int]) -> None:
        """Journal ``received`` for each study an association stored files of."""
        for study_uid, count in counts.items():
            with self.lock:
                key = self.keys.key_of(study_uid)
                state = self.record("received", key, instances=count, calling_ae=calling_ae or None)
            log.info("study %s: %d instance(s) received from %s (%s)", key, count, calling_ae or "?", state.phase)

    # --- the main loop (main thread) ----------------------------------------------------------
    def serve(self, server: StorageServer) -> int:
        """Recover, listen, and run the scheduler until SIGINT/SIGTERM; returns 0."""
        self.recover()
        server.start()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        sends = ", ".join(p.text for p in self.options.link.destinations) if self.options.link else "nowhere"
        log.info("listening as %s on %s:%d (quiet period %g s; results sent to %s); folder %s", server.ae_title,
                 server.bind, server.port, self.options.quiet_seconds, sends, self.folder)
        try:
            while not self.stop.is_set():
                self.tick()
                self.stop.wait(TICK_S)
        finally:
            server.stop()
            self._stop_worker()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped")
        return 0

    def _on_signal(self, signum: int, _frame) -> None:
        log.info("stopping (%s)", signal.Signals(signum).name)
        self.stop.set()

    def recover(self) -> None:
        """After a restart: drop temporary files, journal files the journal missed, requeue interrupted studies."""
        removed = remove_partial_files(self.incoming)
        if removed:
            log.info("%d unacknowledged partial file(s) removed from %s", removed, self.incoming)
        for folder in sorted(p for p in self.incoming.glob("*") if p.is_dir()) if self.incoming.is_dir() else []:
            state = self.states.get(folder.name)
            extra = count_files(folder) - (state.total if state else 0)
            if extra > 0:  # stored before a crash ended the association
                self.record("received", folder.name, instances=extra)
        now = time.monotonic()
        for state in self.states.values():
            if state.phase == "predicting":  # the worker died with the node: predict it again
                state.phase = "queued"
            elif state.phase == "receiving":  # more files may come: a full quiet period again
                self.arrivals[state.key] = now
        phases = [s.phase for s in self.states.values()]
        if phases:
            log.info("journal: %d stud(ies): %s", len(phases),
                     ", ".join(f"{phases.count(p)} {p}" for p in dict.fromkeys(phases)))

    def tick(self) -> None:
        """One round of the scheduler: mark quiet studies, reap or start the worker, send results."""
        self._mark_quiet()
        self._reap_worker()
        if self.worker is None and not self.stop.is_set():
            self._start_next()
        self._send_pending()

    def _quiet(self, key: str, now: float) -> bool:
        return now - self.arrivals.get(key, float("-inf")) >= self.options.quiet_seconds

    def _mark_quiet(self) -> None:
        now = time.monotonic()
        with self.lock:
            ready = [s for s in self.states.values() if s.phase == "receiving" and self._quiet(s.key, now)]
        for state in ready:
            files = count_files(self.incoming / state.key)
            self.record("quiet", state.key, instances=files)
            log.info("study %s: quiet for %g s, %d instance(s): queued", state.key, self.options.quiet_seconds, files)

    def _start_next(self) -> None:
        now = time.monotonic()
        with self.lock:
            queued = sorted((s for s in self.states.values() if s.phase == "queued" and self._quiet(s.key, now)),
                            key=lambda s: s.queued_seq)
        if not queued:
            return
        state = queued[0]
        results = self.results / state.results_name()
        self.record("started", state.key, cycle=state.cycle)
        try:
            process = self._spawn(state, results)
        except Exception as exc:  # noqa: BLE001 - a worker that cannot start fails this study only
            self.record("predicted", state.key, cycle=state.cycle, outcome="failed",
                        error=f"the prediction could not start: {_problem(exc)}")
            log.warning("study %s: the prediction could not start: %s", state.key, _problem(exc))
            return
        self.worker = Worker(state, process, results, time.monotonic())
        log.info("study %s: predicting (cycle %d, process %d)", state.key, state.cycle, process.pid)

    def _spawn(self, state: StudyState, results: Path) -> subprocess.Popen:
        """Start the worker of ``state`` into ``results`` (named by the node's study key)."""
        results.mkdir(parents=True, exist_ok=True)
        entry = self.keys.studies.get(state.key)
        if entry is not None:
            StudyKeys(salt=self.keys.salt, studies={state.key: entry}).write(StudyKeys.in_folder(results))
        env = {k: v for k, v in os.environ.items() if k != CRASH_HOOK}  # the test hook is the node's, not the worker's
        with (results / WORKER_LOG).open("ab") as out:
            return subprocess.Popen(worker_command(self.incoming / state.key, results, self.options.predict_args),
                                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _reap_worker(self) -> None:
        worker = self.worker
        if worker is None or worker.process.poll() is None:
            return
        self.worker = None
        if self.stop.is_set():
            return
        state, seconds = worker.state, time.monotonic() - worker.started
        try:
            outcome = collect(self.folder, worker.results, state.key, self.options.formats, worker.process.returncode)
        except Exception as exc:  # noqa: BLE001 - a results folder the node cannot read fails this study only
            outcome = Outcome([], {}, f"the results cannot be read: {_problem(exc)}")
        series = outcome.series_uids or None
        if outcome.error:
            self.record("predicted", state.key, cycle=state.cycle, outcome="failed", series_uids=series,
                        error=outcome.error)
            log.warning("study %s: failed after %.1f s: %s", state.key, seconds, outcome.error)
        else:
            self.record("predicted", state.key, cycle=state.cycle, outcome="ok", series_uids=series,
                        outputs=outcome.outputs)
            log.info("study %s: predicted in %.1f s, %d result object(s)", state.key, seconds, len(outcome.outputs))

    def _send_pending(self) -> None:
        with self.lock:
            sending = [s for s in self.states.values() if s.phase == "sending"]
        for state in sending:
            if self.sender is not None:
                for peer in self.sender.destinations:
                    self._send(state, peer)
            if self._acknowledged(state):
                self.record("done", state.key, outputs=state.outputs)
                log.info("study %s: done", state.key)

    def _send(self, state: StudyState, peer) -> None:
        assert self.sender is not None
        now = time.time()
        if now < state.retry_at.get(peer.text, 0.0) or self._acknowledged(state, [peer]):
            return
        try:
            self.sender.send_to(peer, state.key, [self.folder / o.file for o in state.outputs])
        except Exception as exc:  # noqa: BLE001 - whatever a send round meets, the node goes on and retries later
            problem = _problem(exc)
            attempt = state.attempts.get(peer.text, 0) + 1
            wait = min(MAX_RETRY_WAIT_S, self.options.retry_seconds * 2 ** (attempt - 1))
            retry_at = datetime.fromtimestamp(now + wait, UTC).isoformat(timespec="milliseconds")
            self.record("send_failed", state.key, to=peer.text, attempt=attempt, error=problem, retry_at=retry_at)
            log.warning("study %s: sending to %s failed (round %d): %s; next round in %g s", state.key, peer.text,
                        attempt, problem, wait)

    def _acknowledged(self, state: StudyState, peers: Sequence | None = None) -> bool:
        """True when every destination (or ``peers``) acknowledged every result of the study."""
        if self.sender is None:
            return True
        sops = {o.sop for o in state.outputs}
        return all(sops <= self.sender.sent.get(p.text, set()) for p in (peers or self.sender.destinations))

    def _stop_worker(self) -> None:
        worker, self.worker = self.worker, None
        if worker is None or worker.process.poll() is not None:
            return
        worker.process.terminate()
        try:
            worker.process.wait(timeout=STOP_WORKER_S)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait(timeout=STOP_WORKER_S)
        log.info("study %s: prediction interrupted; it is predicted again after a restart", worker.state.key)


def _problem(exc: BaseException) -> str:
    """One line saying what went wrong: a UserError's problem, else the exception's type and message."""
    if isinstance(exc, UserError):
        return exc.problem
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
