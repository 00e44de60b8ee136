"""Render the README's pictures: the key image and the rendered narrative report for a synthetic study
with hand-written findings (so the picture shows what a real model's output looks like, labelled as such).

    .venv/bin/python scripts/render_docs_images.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_sr_support import CREATED_AT, lumbar_mr_case  # noqa: E402

from sr_templates import OutputOptions, build_outputs  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="spinemed-docs-") as tmp_s:
        return _render(Path(tmp_s))


def _render(tmp: Path) -> int:
    case = lumbar_mr_case(tmp)
    outputs = build_outputs(case.study, case.findings, OutputOptions(key_image=True), created_at=CREATED_AT)
    sr, narrative, key = outputs
    pixels = key.pixel_array
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(REPO / "docs" / "key-image.png")
    for name, ds in (("measurement", sr), ("narrative", narrative)):
        path = tmp / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, check=True).stdout
        (tmp / f"{name}.txt").write_text(out)
        print(f"== {name}: {path}\n{out[:4000]}")
    print(pydicom.dcmread(tmp / "measurement.dcm").SeriesDescription)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
