"""`pacsgrid correct` and `pacsgrid reject`: corrections over the stored objects.

Every command goes through `Archive.corrections` (the same rules, lock, documents and audit as
the web admin API and the HL7 listener) and may run while `pacsgrid serve` serves the archive.
A person's correction says why (`--reason`); the audit log records who (the local user).
"""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Callable
from dataclasses import asdict

from pacsgrid.archive import Archive, Caller
from pacsgrid.archive.correction_plans import PatientRef
from pacsgrid.archive.corrections import Outcome, describe
from pacsgrid.cli.common import add_archive_options, settings_from, setup_logging

# Options that set a patient attribute, and the attribute.
VALUE_OPTIONS = (
    ("name", "PatientName", "PatientName, e.g. 'DOE^JANE'"),
    ("birth_date", "PatientBirthDate", "PatientBirthDate, YYYYMMDD"),
    ("sex", "PatientSex", "PatientSex: M, F, O (or '' for none)"),
)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "correct",
        help="correct patients and studies (reversible; stored objects never change)",
        description="Corrections are kept beside the stored objects, which never change: "
        "queries answer, and retrieves send, the corrected values. Each correction is written "
        "to every archive site (reindex restores it), audited, and can be undone.",
    )
    csub = p.add_subparsers(dest="what", metavar="COMMAND", required=True)

    c = csub.add_parser(
        "patient",
        help="change attributes of every study of a patient",
        description="Change PatientID, IssuerOfPatientID, PatientName, PatientBirthDate or "
        "PatientSex of every study of the patient. A new PatientID must not have studies "
        "already (merge then).",
    )
    c.add_argument("patient_id", metavar="PATIENT_ID")
    c.add_argument("--issuer", default="", help="IssuerOfPatientID of the patient")
    c.add_argument("--new-id", help="new PatientID")
    c.add_argument("--new-issuer", help="new IssuerOfPatientID")
    _value_options(c)
    _common(c, run_patient)

    c = csub.add_parser(
        "merge",
        help="merge one patient into another",
        description="Every study of patient MERGED_ID goes to patient INTO_ID (with INTO_ID's "
        "attributes, changed by the options given).",
    )
    c.add_argument("merged_id", metavar="MERGED_ID")
    c.add_argument("into_id", metavar="INTO_ID")
    c.add_argument("--merged-issuer", default="", help="IssuerOfPatientID of MERGED_ID")
    c.add_argument("--into-issuer", default="", help="IssuerOfPatientID of INTO_ID")
    _value_options(c)
    _common(c, run_merge)

    c = csub.add_parser(
        "move-study",
        help="file one study under another patient",
        description="The study goes to patient PATIENT_ID (with that patient's attributes when "
        "the archive knows the patient, changed by the options given).",
    )
    c.add_argument("study_uid", metavar="STUDY_UID")
    c.add_argument("patient_id", metavar="PATIENT_ID")
    c.add_argument("--issuer", default="", help="IssuerOfPatientID of PATIENT_ID")
    _value_options(c)
    _common(c, run_move)

    c = csub.add_parser(
        "undo",
        help="undo a correction (recorded as a correction itself)",
        description="Undo correction N. Refused while a later correction of the same studies, "
        "patients or instances stands: undo those first, newest first.",
    )
    c.add_argument("seq", type=int, metavar="N")
    _common(c, run_undo)

    c = csub.add_parser("list", help="list corrections, newest first")
    add_archive_options(c)
    c.add_argument("--limit", type=int, default=50)
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=run_list)

    c = csub.add_parser("show", help="print the document of correction N (as the sites hold it)")
    add_archive_options(c)
    c.add_argument("seq", type=int, metavar="N")
    c.set_defaults(func=run_show)

    p = sub.add_parser(
        "reject",
        help="instances hidden by rejection notes (IOCM): list, show again",
        description="A Key Object Selection Document with a rejection title (113001, 113037, "
        "113038, 113039) received by C-STORE or STOW hides the instances it references from "
        "queries and retrieves. Their bytes stay on the sites.",
    )
    rsub = p.add_subparsers(dest="what", metavar="COMMAND", required=True)
    c = rsub.add_parser("list", help="list hidden instances, newest rejection first")
    add_archive_options(c)
    c.add_argument("--by", type=int, default=0, metavar="N", help="only those correction N hid")
    c.add_argument("--study", default="", metavar="UID", help="only those of one study")
    c.add_argument("--limit", type=int, default=100)
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=run_reject_list)

    c = rsub.add_parser(
        "unhide",
        help="show hidden instances again",
        description="Show instances again: the SOP Instance UIDs given, or every instance "
        "correction N hid (--by), or every hidden instance of a study (--study). Recorded as a "
        "correction (undo it to hide them again).",
    )
    c.add_argument("sop_uids", nargs="*", metavar="SOP_UID")
    c.add_argument("--by", type=int, default=0, metavar="N")
    c.add_argument("--study", default="", metavar="UID")
    _common(c, run_unhide)

    c = rsub.add_parser(
        "purge",
        help="delete the objects of a 113039 rejection (retention policy; off by default)",
        description="The archive's one deletion. Without --confirm: list what the rejection "
        "note of correction N (titled 113039, Data Retention Policy Expired) hides, and print "
        "the code that confirms exactly that list. With --confirm CODE: delete those objects "
        "from every site, recorded and audited as a correction that cannot be undone. Only "
        "when retention.purge_rejected is true, retention.purge_after_days after the "
        "rejection, and every site holding a copy is up.",
    )
    c.add_argument("--by", type=int, required=True, metavar="N", help="the rejection")
    c.add_argument("--confirm", metavar="CODE", help="the code the listing printed")
    c.add_argument("--reason", help="why (required with --confirm)")
    add_archive_options(c)
    c.set_defaults(func=run_purge)


def _value_options(p: argparse.ArgumentParser) -> None:
    for opt, _, text in VALUE_OPTIONS:
        p.add_argument("--" + opt.replace("_", "-"), dest=opt, help=text)


def _common(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    p.add_argument("--reason", required=True, help="why (kept with the correction and audited)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_archive_options(p)
    p.set_defaults(func=func)


def _changes(args: argparse.Namespace) -> dict[str, str]:
    out = {attr: getattr(args, opt) for opt, attr, _ in VALUE_OPTIONS}
    if getattr(args, "new_id", None) is not None:
        out["PatientID"] = args.new_id
    if getattr(args, "new_issuer", None) is not None:
        out["IssuerOfPatientID"] = args.new_issuer
    return {k: v for k, v in out.items() if v is not None}


def _caller() -> Caller:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return Caller(user=user, via="cli")


def _with_archive(args: argparse.Namespace, work: Callable[[Archive], int]) -> int:
    settings = settings_from(args)
    setup_logging(settings, quiet=True)
    archive = Archive(settings, probe_interval=0)
    try:
        return work(archive)
    finally:
        archive.close()


def _report(args: argparse.Namespace, outcome: Outcome) -> int:
    c = outcome.correction
    if args.json:
        doc = json.loads(c.to_json()) if c else None
        print(json.dumps({"detail": outcome.detail, "seq": outcome.seq, "correction": doc}))
        return 0
    print(outcome.detail)
    if c is not None and not c.purge:
        print(f"  undo with: pacsgrid correct undo {c.seq} --reason '...'")
    return 0


def run_patient(args: argparse.Namespace) -> int:
    ref = PatientRef(args.patient_id, args.issuer)
    return _with_archive(
        args,
        lambda a: _report(
            args, a.corrections.update_patient(_caller(), ref, _changes(args), args.reason)
        ),
    )


def run_merge(args: argparse.Namespace) -> int:
    merged = PatientRef(args.merged_id, args.merged_issuer)
    into = PatientRef(args.into_id, args.into_issuer)
    return _with_archive(
        args,
        lambda a: _report(
            args, a.corrections.merge(_caller(), merged, into, _changes(args), args.reason)
        ),
    )


def run_move(args: argparse.Namespace) -> int:
    to = PatientRef(args.patient_id, args.issuer)
    return _with_archive(
        args,
        lambda a: _report(
            args,
            a.corrections.move_study(_caller(), args.study_uid, to, _changes(args), args.reason),
        ),
    )


def run_undo(args: argparse.Namespace) -> int:
    return _with_archive(
        args, lambda a: _report(args, a.corrections.undo(_caller(), args.seq, args.reason))
    )


def run_unhide(args: argparse.Namespace) -> int:
    if not (args.sop_uids or args.by or args.study):
        print("pacsgrid: error: name SOP Instance UIDs, --by N or --study UID")
        return 2
    return _with_archive(
        args,
        lambda a: _report(
            args,
            a.corrections.unhide(
                _caller(), args.sop_uids, by=args.by, study_uid=args.study, reason=args.reason
            ),
        ),
    )


def run_list(args: argparse.Namespace) -> int:
    def work(a: Archive) -> int:
        rows = a.corrections.recent(_caller(), args.limit, args.offset)
        if args.json:
            print(json.dumps([describe(r) for r in rows], indent=1))
            return 0
        if not rows:
            print("no corrections")
        for r in rows:
            d = describe(r)
            state = f"undone by #{r.undone_by}" if r.undone_by else r.state
            print(f"#{r.seq:<5} {d['time']}  {r.kind:<10} {state:<14} {d['who']}: {d['reason']}")
            print(f"       {d['summary']}")
        return 0

    return _with_archive(args, work)


def run_show(args: argparse.Namespace) -> int:
    def work(a: Archive) -> int:
        row = a.corrections.get(_caller(), args.seq)
        if row is None:
            print(f"pacsgrid: error: no correction #{args.seq}")
            return 1
        print(row.doc.to_json().decode())
        return 0

    return _with_archive(args, work)


def run_purge(args: argparse.Namespace) -> int:
    if args.confirm is not None and not (args.reason or "").strip():
        print("pacsgrid: error: --reason is required with --confirm")
        return 2

    def work(a: Archive) -> int:
        if args.confirm is None:
            plan = a.corrections.purge_plan(_caller(), args.by)
            copies = sum(len(r.copies) for r in plan.instances)
            print(
                f"correction #{plan.by} hides {len(plan.instances)} stored instance(s): "
                f"{plan.bytes} bytes in {copies} copies"
            )
            if plan.refusal:
                print(f"not allowed now: {plan.refusal}")
                return 1
            print(f"confirmation code: {plan.code}")
            print(
                f"to delete them for good: pacsgrid reject purge --by {plan.by} "
                f"--confirm {plan.code} --reason '...'"
            )
            return 0
        return _report(args, a.corrections.purge(_caller(), args.by, args.confirm, args.reason))

    args.json = False
    return _with_archive(args, work)


def run_reject_list(args: argparse.Namespace) -> int:
    def work(a: Archive) -> int:
        rows = a.corrections.hidden(
            _caller(), args.limit, args.offset, by=args.by, study_uid=args.study
        )
        if args.json:
            print(json.dumps([asdict(r) for r in rows], indent=1))
            return 0
        if not rows:
            print("no hidden instances")
        for r in rows:
            where = f"{r.study_uid}/{r.series_uid}" if r.stored else "(not received)"
            print(f"{r.sop_uid}  hidden by #{r.by}  {where}")
        return 0

    return _with_archive(args, work)
