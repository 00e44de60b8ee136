"""An independent TID 1500 reader: dcmqi's ``tid1500reader`` (PyPI ``dcmqi``, QIICR) reads our SR.

Every TID 1410 group we write (one per localised finding) comes back as one dcmqi measurement with our
finding, finding site, laterality, tracking identifiers, algorithm, measurements (value, quantity and
UCUM unit) and severity / grade as qualitative evaluations; the image library lists the evidence.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from test_sr_support import CREATED_AT, Case, lumbar_mr_case, scoliosis_case

from sr_templates import build_outputs, read_measurement_report
from sr_templates.codes import (
    FINDING_CODES,
    LATERALITY_CODES,
    MEASUREMENT_CODES,
    MEYERDING_GRADE_CODES,
    SEVERITY_CODES,
    level_code,
    unit_code,
)


def _tid1500reader() -> str:
    exe = shutil.which("tid1500reader") or str(Path(sys.executable).parent / "tid1500reader")
    if not Path(exe).is_file():
        pytest.fail("dcmqi's tid1500reader is missing: .venv/bin/pip install dcmqi (in the dev extras)")
    return exe


def _code(c: object) -> dict[str, str]:
    return {"CodeValue": c.value, "CodingSchemeDesignator": c.scheme_designator,  # type: ignore[attr-defined]
            "CodeMeaning": c.meaning}  # type: ignore[attr-defined]


def _read_with_dcmqi(ds: pydicom.Dataset, tmp_path: Path) -> dict[str, object]:
    path, out = tmp_path / "sr.dcm", tmp_path / "sr.json"
    ds.save_as(path, enforce_file_format=True)
    res = subprocess.run([_tid1500reader(), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return dict(json.loads(out.read_text()))


@pytest.mark.parametrize("make", [lumbar_mr_case, scoliosis_case], ids=["mr", "xr"])
def test_dcmqi_reads_our_tid1500(make: object, tmp_path: Path) -> None:
    case: Case = make(tmp_path / "case")  # type: ignore[operator]
    sr = build_outputs(case.study, case.findings, created_at=CREATED_AT)[0]
    got = _read_with_dcmqi(sr, tmp_path)
    ours = read_measurement_report(sr)
    assert got["VerificationFlag"] == "UNVERIFIED" and got["CompletionFlag"] == "COMPLETE"
    assert got["procedureReported"] == _code(ours.procedure_reported[0])  # type: ignore[arg-type]
    observer = got["observerContext"]
    assert observer["ObserverType"] == "DEVICE"  # type: ignore[index]
    assert observer["DeviceObserverUID"] == ours.device_observer_uid  # type: ignore[index]

    measurements = got["Measurements"]
    assert isinstance(measurements, list) and ours.groups
    assert len(measurements) == len(ours.groups)
    model = case.findings.model
    for group, m in zip(ours.groups, measurements, strict=True):
        (finding,) = group.findings
        assert m["TrackingIdentifier"] == group.tracking_identifier
        assert m["TrackingUniqueIdentifier"] == group.tracking_uid
        assert m["Finding"] == _code(FINDING_CODES[finding.finding])
        assert m["FindingSite"] == _code(level_code(finding.level))
        if finding.laterality is not None and finding.laterality.value != "central":
            assert m["Laterality"] == _code(LATERALITY_CODES[finding.laterality])
        alg = m["measurementAlgorithmIdentification"]
        assert (alg["AlgorithmName"], alg["AlgorithmVersion"]) == (model.name, model.version)
        items = m["measurementItems"]
        assert len(items) == len(finding.measurements)
        for want, item in zip(finding.measurements, items, strict=True):
            assert item["quantity"] == _code(MEASUREMENT_CODES[want.type])
            assert item["units"] == _code(unit_code(want.unit))
            assert float(item["value"]) == pytest.approx(want.value)
        evaluations = {e["conceptCode"]["CodeValue"]: e["conceptValue"] for e in m["qualitativeEvaluations"]}
        if finding.severity.value != "none":
            assert evaluations["246112005"] == _code(SEVERITY_CODES[finding.severity])
        if finding.grade is not None:
            assert MEYERDING_GRADE_CODES[finding.grade].value in json.dumps(evaluations)
        assert evaluations["121106"] == group.summary
    library = set(got["imageLibrary"])  # type: ignore[arg-type]
    for group in ours.groups:
        for uid, _ in group.source_images:
            assert uid in library
