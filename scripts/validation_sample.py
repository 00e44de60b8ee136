#!/usr/bin/env python3
"""Write a small labelled validation sample from synthetic phantoms, to try ``spinemed-node validate``.

    python scripts/validation_sample.py OUT [--studies 4]
    spinemed-node validate OUT/cases --labels OUT/labels.csv --out OUT/report

Each study is a lumbar MR phantom (dicom_node.devtools.phantoms.make_lumbar_mr) whose planted finding is a
posterior disc herniation at L4-L5.  The labels (our per-level CSV, docs/validation.md) say what was
planted: disc_herniation Moderate at L4-L5 with a point at the disc centre on the mid-sagittal T2 slice,
Normal/Mild at the other lumbar discs, and no canal stenosis anywhere.  The grade "Moderate" is a choice:
a phantom has no clinical grade.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.devtools.phantoms import make_lumbar_mr

DISCS = (("L1", "L2"), ("L2", "L3"), ("L3", "L4"), ("L4", "L5"), ("L5", "S1"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--studies", type=int, default=4)
    args = parser.parse_args()
    rows = [["study", "level", "condition", "grade", "laterality", "series", "instance", "x", "y", "cobb_angle_deg"]]
    for n in range(1, args.studies + 1):
        name = f"case-{n:03d}"
        s = make_lumbar_mr(args.out / "cases" / name, seed=100 + n, patient_id=f"SYN-VAL-{n:03d}")
        mid = next(ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in s.paths)
                   if int(ds.SeriesNumber) == 2 and abs(float(ds.ImagePositionPatient[0])) < 1e-6)
        ipp = np.asarray(mid.ImagePositionPatient, float)
        row_dir = np.asarray(mid.ImageOrientationPatient[:3], float)
        col_dir = np.asarray(mid.ImageOrientationPatient[3:], float)
        spacing = [float(v) for v in mid.PixelSpacing]
        for upper, lower in DISCS:
            level = f"{upper}-{lower}"
            centre = (np.asarray(s.vertebra_centres[upper]) + np.asarray(s.vertebra_centres[lower])) / 2 - ipp
            x, y = float(centre @ row_dir / spacing[1]), float(centre @ col_dir / spacing[0])
            planted = s.truth.get(level) == "disc_herniation"
            point = ["2", str(mid.InstanceNumber), f"{x:.2f}", f"{y:.2f}"] if planted else ["", "", "", ""]
            rows.append([name, level, "disc_herniation", "Moderate" if planted else "Normal/Mild", "", *point, ""])
            rows.append([name, level, "spinal_canal_stenosis", "Normal/Mild", "", "", "", "", "", ""])
    with (args.out / "labels.csv").open("w", newline="") as fp:
        csv.writer(fp).writerows(rows)
    print(f"{args.studies} studies in {args.out / 'cases'}, labels in {args.out / 'labels.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
