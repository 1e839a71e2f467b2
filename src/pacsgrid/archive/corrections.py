"""Corrections through the archive: made one at a time, durable on the sites, then applied.

`Archive.corrections` is what every front end calls to correct (the CLI, the web admin API,
the HL7 listener) and what ingest calls when a rejection note arrives. A correction is made
under the index's corrections lock (one at a time across processes and nodes), in three
steps, storage before index as for every object:

1. the plan (archive/correction_plans.py) is recorded in the index as `pending`;
2. its document goes to every healthy archive site through `StorageSite.put` (at least
   `replication.write_quorum` of them; sites that were down get it when they come back);
3. the index applies it in one transaction, and only then is it acknowledged and audited.

A crash between 1 and 3 leaves a pending correction, which whoever next takes the lock (the
next correction, or recovery at start-up) finishes first, so the order of `seq` stays the
order in which corrections took effect. Nothing here changes a stored object.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pacsgrid import metrics
from pacsgrid.access_log import now_iso
from pacsgrid.archive.correction_plans import (
    PatientRef,
    PurgePlan,
    Request,
    plan_merge,
    plan_move,
    plan_purge,
    plan_reject,
    plan_undo,
    plan_unhide,
    plan_update,
    purge_correction,
)
from pacsgrid.archive.records import Caller
from pacsgrid.archive.recovery import note_for
from pacsgrid.correction import Correction, Who, doc_key
from pacsgrid.dicomfile.kos import rejection_note
from pacsgrid.errors import (
    CorrectionConflict,
    InvalidDataset,
    PacsgridError,
    QuorumNotMet,
    SiteUnavailable,
    StorageError,
)
from pacsgrid.index import CorrectionRow, HiddenInstance

if TYPE_CHECKING:
    from pacsgrid.archive.service import Archive

log = logging.getLogger("pacsgrid.corrections")

Plan = Callable[[int, Request], Correction | None]


@dataclass(frozen=True)
class Outcome:
    """What a correction request did: the correction made (None: nothing to change, or a
    request acted on before, then `seq` names what it did then)."""

    correction: Correction | None
    detail: str
    seq: int | None = None
    repeated: bool = False


class Corrections:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.index = archive._index

    # ------------------------------------------------------------------ requests
    def update_patient(
        self,
        caller: Caller,
        patient: PatientRef,
        changes: Mapping[str, str],
        reason: str = "",
        *,
        source: str = "",
    ) -> Outcome:
        """Change attributes of every study of `patient` (a new PatientID included).

        `source` (every request): the id of what asked, when it has one (an HL7 message):
        acted on at most once, a repeat is answered with what was done the first time."""
        return self._make(
            caller,
            reason,
            lambda seq, req: plan_update(self.index, seq, req, patient, changes),
            source=source,
        )

    def merge(
        self,
        caller: Caller,
        merged: PatientRef,
        into: PatientRef,
        changes: Mapping[str, str] | None = None,
        reason: str = "",
        *,
        source: str = "",
    ) -> Outcome:
        """Every study of patient `merged` to patient `into`."""
        return self._make(
            caller,
            reason,
            lambda seq, req: plan_merge(self.index, seq, req, merged, into, changes or {}),
            source=source,
        )

    def move_study(
        self,
        caller: Caller,
        study_uid: str,
        to: PatientRef,
        changes: Mapping[str, str] | None = None,
        reason: str = "",
    ) -> Outcome:
        return self._make(
            caller,
            reason,
            lambda seq, req: plan_move(self.index, seq, req, study_uid, to, changes or {}),
        )

    def undo(self, caller: Caller, seq: int, reason: str = "") -> Outcome:
        """Undo correction `seq` (itself a correction, which can be undone in turn)."""
        return self._make(caller, reason, lambda n, req: plan_undo(self.index, n, req, seq))

    def unhide(
        self,
        caller: Caller,
        sop_uids: Sequence[str] = (),
        *,
        by: int = 0,
        study_uid: str = "",
        reason: str = "",
    ) -> Outcome:
        """Show instances a rejection hid: these, or every one correction `by` hid, or every
        hidden one of a study."""
        return self._make(
            caller,
            reason,
            lambda n, req: plan_unhide(self.index, n, req, list(sop_uids), by, study_uid),
        )

    def after_store(
        self, dataset: bytes | memoryview, transfer_syntax: str, caller: Caller, sop_uid: str
    ) -> Outcome | None:
        """Ingest: a Key Object Selection Document was stored; if it is a rejection note, the
        instances it references are hidden (once per note, also when it is sent again)."""
        try:
            note = rejection_note(dataset, transfer_syntax)
        except InvalidDataset as e:
            log.warning("key object selection %s is stored but not applied: %s", sop_uid, e)
            self.archive.audit(caller, "correct", "failed", "", f"rejection note: {e}")
            return None
        if note is None:
            return None
        reason = f"rejection note {note.code} {note.meaning}"
        return self._make(
            caller,
            reason,
            lambda n, req: plan_reject(self.index, n, req, note),
            source=f"kos:{note.sop_uid}",
            authorized=True,
        )

    def purge_plan(self, caller: Caller, by: int) -> PurgePlan:
        """What `purge` would delete for rejection `by`, and why it may not (yet)."""
        self.archive.authorize(caller, "purge")
        return plan_purge(self.index, self.archive.settings.retention, by, time.time())

    def purge(self, caller: Caller, by: int, confirm: str, reason: str) -> Outcome:
        """Delete, from every site, the objects rejection `by` (113039) hides: the archive's
        one deletion, allowed only by `retention.purge_rejected`, after
        `retention.purge_after_days`, with the code `purge_plan` showed for the same list.
        The purge is recorded on the sites before any byte is deleted; it cannot be undone."""
        self.archive.authorize(caller, "purge")

        def plan(seq: int, req: Request) -> Correction | None:
            p = plan_purge(self.index, self.archive.settings.retention, by, time.time())
            if p.refusal:
                raise CorrectionConflict(p.refusal)
            if p.code != confirm:
                raise CorrectionConflict(
                    "the confirmation code does not match the list of objects (it changed, or "
                    "the code is wrong): run 'pacsgrid reject purge --by N' again and check it"
                )
            if not p.instances:
                return None
            down = {
                c.site
                for r in p.instances
                for c in r.copies
                if c.site not in self.archive._placement.sites
                or not self.archive._placement.is_up(c.site)
            }
            if down:
                raise CorrectionConflict(
                    f"site(s) {', '.join(sorted(down))} hold copies and are down: a purge "
                    "deletes every copy, so it waits for them"
                )
            return purge_correction(seq, req, p)

        return self._make(caller, reason, plan, authorized=True)

    def _delete_objects(self, c: Correction) -> None:
        """The objects of a purge, from every site that holds them (already gone: fine)."""
        for mark in c.purge:
            record = self.index.instance(mark.sop)
            for copy in record.copies if record is not None else ():
                site = self.archive._placement.sites.get(copy.site)
                if site is None:
                    raise CorrectionConflict(f"site {copy.site} is not configured: cannot purge")
                metrics.SITE_OPS.labels(site.name, "purge").inc()
                site.purge(copy.key)
        log.warning("%s (retention policy), by %s", c.summary(), c.who)

    # ------------------------------------------------------------------ reading
    def recent(self, caller: Caller, limit: int = 50, offset: int = 0) -> list[CorrectionRow]:
        """Corrections, newest first."""
        self.archive.authorize(caller, "correct")
        return self.index.corrections(limit, offset)

    def get(self, caller: Caller, seq: int) -> CorrectionRow | None:
        self.archive.authorize(caller, "correct")
        return self.index.correction(seq)

    def hidden(
        self, caller: Caller, limit: int = 100, offset: int = 0, *, by: int = 0, study_uid: str = ""
    ) -> list[HiddenInstance]:
        self.archive.authorize(caller, "correct")
        return self.index.hidden_instances(limit, offset, by=by, study_uid=study_uid)

    def seen(self, source: str) -> tuple[str, int | None] | None:
        return self.index.source_outcome(source)

    def remember(self, source: str, outcome: str) -> None:
        """A once-only request answered without a correction (nothing to change)."""
        self.index.record_source(source, outcome)

    # ------------------------------------------------------------------ making one
    def _make(
        self,
        caller: Caller,
        reason: str,
        plan: Plan,
        *,
        source: str = "",
        authorized: bool = False,
    ) -> Outcome:
        if not authorized:
            self.archive.authorize(caller, "correct")
        who = Who(caller.user, caller.ae_title, caller.address, caller.via)
        try:
            with self.index.corrections_lock():
                self._roll_forward()
                if source:
                    done = self.index.source_outcome(source)
                    if done is not None:
                        return Outcome(None, done[0], done[1], repeated=True)
                seq = self.index.next_correction_seq()
                c = plan(seq, Request(who, now_iso(), reason[:1000], source))
                if c is None:
                    if source:
                        self.index.record_source(source, "nothing to change")
                    return Outcome(None, "nothing to change")
                self._check_free(c.seq)
                self.index.add_pending_correction(c)
                missing = self._write(c)
                if c.purge:
                    self._delete_objects(c)
                self.index.apply_correction(c, missing)
        except PacsgridError as e:
            metrics.CORRECTIONS.labels("failed").inc()
            self.archive.audit(caller, "correct", "failed", "", str(e))
            raise
        metrics.CORRECTIONS.labels(c.kind).inc()
        studies = c.studies
        self.archive.audit(caller, "correct", "success", studies[0] if studies else "", c.summary())
        log.info("%s, by %s", c.summary(), who)
        return Outcome(c, c.summary(), c.seq)

    def _check_free(self, seq: int) -> None:
        """The sites must not hold a correction under `seq` already: an index restored from
        an older backup would otherwise write a second history over the first."""
        for site in self.archive._placement.write_targets():
            try:
                found = site.stat(doc_key(seq)) is not None
            except StorageError:
                continue
            if found:
                raise CorrectionConflict(
                    f"site {site.name} holds correction #{seq} already, which the index does "
                    "not know (an older index?): run 'pacsgrid reindex' first"
                )

    def _write(self, c: Correction) -> list[str]:
        """Put the document of `c` on every healthy archive site; the archive sites that did
        not get it. QuorumNotMet (and `c` stays pending) below the write quorum."""
        data = c.to_json()
        digest = hashlib.sha256(data).hexdigest()
        key = doc_key(c.seq)
        written: list[str] = []
        errors: list[str] = []
        for site in self.archive._placement.write_targets():
            metrics.SITE_OPS.labels(site.name, "put").inc()
            try:
                result = site.put(key, [data], sha256=digest, note=note_for("correction", ""))
                if not result.created and site.get(key) != data:
                    raise StorageError(site.name, f"{key} holds another correction")
                written.append(site.name)
            except SiteUnavailable as e:
                metrics.SITE_ERRORS.labels(site.name, "put").inc()
                self.archive._placement.mark_down(site.name, str(e))
                errors.append(str(e))
            except StorageError as e:
                metrics.SITE_ERRORS.labels(site.name, "put").inc()
                errors.append(str(e))
        quorum = self.archive.settings.replication.write_quorum
        if len(written) < quorum:
            raise QuorumNotMet(
                f"correction #{c.seq} is recorded but is on {len(written)} of the {quorum} "
                f"archive site(s) it needs ({'; '.join(errors) or 'no healthy site'}); it "
                "takes effect, in order, once the sites take it (at the next correction or start)"
            )
        return [s.name for s in self.archive._placement.archive_sites() if s.name not in written]

    def _roll_forward(self) -> int:
        """Finish corrections a crash (or a quorum failure) left pending, in order."""
        done = 0
        for c in self.index.pending_corrections():
            missing = self._write(c)
            if c.purge:
                self._delete_objects(c)
            if self.index.apply_correction(c, missing):
                done += 1
                log.warning("%s: finished after an interruption", c.summary())
        return done

    # ------------------------------------------------------------------ maintenance
    def recover(self) -> int:
        """At start-up: finish pending corrections, give returning sites their documents."""
        try:
            with self.index.corrections_lock():
                done = self._roll_forward()
        except PacsgridError as e:
            log.error("pending corrections cannot be finished now: %s", e)
            done = 0
        self.heal()
        return done

    def heal(self) -> int:
        """Write documents to the archive sites that missed them (they were down)."""
        healed = 0
        try:
            rows = self.index.corrections(1000, missing_only=True)
        except PacsgridError as e:
            log.warning("cannot list corrections to copy to returning sites: %s", e)
            return 0
        sites = {s.name: s for s in self.archive._placement.archive_sites()}
        for row in rows:
            data = row.doc.to_json()
            left = []
            for name in row.missing:
                site = sites.get(name)
                if site is None:
                    continue  # no longer configured
                try:
                    if not self.archive._placement.is_up(name):
                        raise SiteUnavailable(name, "down")
                    site.put(doc_key(row.seq), [data], note=note_for("correction", ""))
                    healed += 1
                except StorageError:
                    left.append(name)
            if tuple(left) != row.missing:
                self.index.set_correction_missing(row.seq, left)
        if healed:
            log.info("%d correction document(s) copied to sites that missed them", healed)
        return healed


def describe(row: CorrectionRow) -> dict[str, Any]:
    """A correction as the list commands and the web admin API show it."""
    c = row.doc
    return {
        "seq": row.seq,
        "kind": row.kind,
        "state": row.state,
        "time": c.time,
        "who": str(c.who),
        "reason": c.reason,
        "source": c.source,
        "summary": c.summary(),
        "undone_by": row.undone_by,
        "missing_on": list(row.missing),
        "request": c.request,
    }
