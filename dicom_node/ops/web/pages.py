"""The read-only jobs page and the rendered reports.

What the jobs page shows, and why: a row per study with its job id, a *study reference* (the same
salted digest of the Study Instance UID that the logs and the audit trail carry), state, revision,
instance count, times and durations of each stage, the reason of a skip or failure (UIDs in it
replaced by their digest) and links to the rendered reports.  It shows **no patient name, patient ID,
accession number, birth date or UID**: the page has no login of its own and a worklist's identifiers
are not needed to run the node.  The report links open the result SR rendered by dcmtk's ``dsr2html``:
a clinical document that shows what any DICOM viewer shows (patient name and ID included), so it is
served only while ``[http] reports = true`` — keep ``[http] host`` on 127.0.0.1 or put an
authenticating reverse proxy in front.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import time
from pathlib import Path

import pydicom

from dicom_node.jobs.model import Job, JobStore, OutputRecord
from dicom_node.log import phi_hash, redact

__all__ = ["REPORT_KINDS", "ReportError", "jobs_page", "redact_uids", "render_report"]

#: Result objects that render as a report, and their link text.
REPORT_KINDS = {"measurement_report": "measurements (TID 1500)", "narrative_report": "narrative", "pdf_report": "PDF"}



class ReportError(Exception):
    """The report cannot be rendered (no such output, dsr2html missing or failing)."""


def redact_uids(text: str) -> str:
    """Replace every DICOM UID (and ``Family^Given`` name) in ``text`` by its digest, as the logs do."""
    return redact(text)


def _when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _dur(a: float | None, b: float | None) -> str:
    if a is None or b is None or b < a:
        return ""
    s = b - a
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}.state{font-weight:600}.done{color:#176b2c}.failed{color:#a11}.skipped{color:#777}
.receiving,.complete,.inferring,.reporting,.exporting{color:#1d4f91}small{color:#666}
"""


def _report_links(job: Job, outputs: list[OutputRecord], reports: bool) -> str:
    if not reports:
        return ""
    links = []
    for o in outputs:
        if o.revision == job.revision and o.kind in REPORT_KINDS:
            links.append(f'<a class="report" href="/jobs/{job.id}/report/{o.kind}">{REPORT_KINDS[o.kind]}</a>')
    return " · ".join(links)


def _consult_link(job: Job, outputs: list[OutputRecord], consult: bool) -> str:
    if not consult or job.state.value != "done" or not any(o.revision == job.revision for o in outputs):
        return ""
    return f'<a class="consult" href="/jobs/{job.id}/consult">consult</a>'


def _links(job: Job, outputs: list[OutputRecord], reports: bool, consult: bool) -> str:
    return " · ".join(x for x in (_report_links(job, outputs, reports), _consult_link(job, outputs, consult)) if x)


def _excluded(kinds: dict[str, int] | None) -> str:
    if not kinds:
        return ""
    n = sum(kinds.values())
    what = ", ".join(f"{html.escape(k)} ({c})" for k, c in sorted(kinds.items()))
    return f'<br><span class="excluded">{n} instance{"s" if n != 1 else ""} left out: {what}</span>'


def jobs_page(store: JobStore, *, limit: int = 200, reports: bool = True, refresh_s: int = 10,
              consult: bool = False) -> str:
    """The HTML jobs page: the ``limit`` most recent jobs, newest first (``consult``: a link to each done
    job's consultation page)."""
    jobs = sorted(store.jobs(), key=lambda j: j.id, reverse=True)[:limit]
    excluded = store.unusable_summary()
    rows = []
    for j in jobs:
        t = j.timings
        outputs = store.outputs(j.study_instance_uid, j.revision) if j.revision else []
        rows.append(
            f'<tr id="job-{j.id}"><td>{j.id}</td><td><code>{phi_hash(j.study_instance_uid)}</code></td>'
            f'<td class="state {j.state.value}">{j.state.value}</td><td>{j.revision}</td>'
            f"<td>{j.instance_count}</td><td>{_when(j.first_received_at)}</td>"
            f"<td>{_dur(j.completed_at, t.get('inferring'))}</td>"
            f"<td>{_dur(t.get('inferring'), t.get('reporting'))}</td>"
            f"<td>{_dur(t.get('exporting'), t.get('done'))}</td>"
            f"<td>{_dur(j.first_received_at, t.get('done'))}</td>"
            f"<td>{_when(j.updated_at)}</td>"
            f"<td>{html.escape(redact_uids(j.reason or ''))}{_excluded(excluded.get(j.study_instance_uid))}</td>"
            f"<td>{_links(j, outputs, reports, consult)}</td></tr>"
        )
    body = "\n".join(rows) or '<tr><td colspan="13">no jobs yet</td></tr>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spinemed-node jobs</title>
<meta http-equiv="refresh" content="{refresh_s}"><style>{_STYLE}</style></head>
<body><h1>spinemed-node — jobs</h1>
<p><small>Read-only. No patient identifiers: studies are shown by a digest of their UID (as in the logs
and the audit trail). Refreshes every {refresh_s} s. <a href="/health/ready">readiness</a> ·
<a href="/metrics">metrics</a></small></p>
<table id="jobs"><thead><tr><th>job</th><th>study ref</th><th>state</th><th>rev</th><th>instances</th>
<th>first received</th><th>queued</th><th>inference</th><th>export</th><th>total</th><th>updated</th>
<th>reason</th><th>report</th></tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""


def render_report(store: JobStore, job_id: int, kind: str, *, timeout_s: float = 30.0) -> tuple[bytes, str]:
    """The job's latest ``kind`` result as the browser shows it: ``(body, media type)``.

    An SR is rendered to HTML by ``dsr2html``; the PDF report is its encapsulated document as it is.

    Raises
    ------
    ReportError
        Unknown kind, no such output on disk, ``dsr2html`` missing or failing.
    JobNotFoundError
        No such job.
    """
    if kind not in REPORT_KINDS:
        raise ReportError(f"unknown report kind {kind!r}")
    job = store.get(job_id)
    match = [o for o in store.outputs(job.study_instance_uid, job.revision) if o.kind == kind]
    if not match or not Path(match[0].path).is_file():
        raise ReportError(f"job {job_id}: no {kind} on disk (not produced yet, or removed by retention)")
    if kind == "pdf_report":
        ds = pydicom.dcmread(match[0].path)
        length = int(ds.get("EncapsulatedDocumentLength", 0)) or len(ds.EncapsulatedDocument)
        return bytes(ds.EncapsulatedDocument)[:length], "application/pdf"
    exe = shutil.which("dsr2html")
    if exe is None:
        raise ReportError("dsr2html (dcmtk) is not installed: apt-get install dcmtk")
    res = subprocess.run([exe, "--charset-assume", "latin-1", match[0].path], capture_output=True,
                         timeout=timeout_s, check=False)
    if res.returncode != 0:
        err = redact_uids(res.stderr.decode(errors="replace"))[:300]
        raise ReportError(f"dsr2html failed ({res.returncode}): {err}")
    return res.stdout, "text/html; charset=utf-8"
