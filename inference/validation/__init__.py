"""Site validation: how well the model does on a site's own labelled cases.

* :mod:`~inference.validation.labels` reads the truth (RSNA 2024 CSVs, our per-level CSV, a radiologist's
  TID 1500 SR) into one typed model;
* :mod:`~inference.validation.metrics` compares it with the model's findings, with study-level
  bootstrap intervals (numpy only);
* :mod:`~inference.validation.report` writes ``report.html``, ``metrics.json`` and ``cases.csv``;
* :mod:`~inference.validation.run` finds the studies in a folder, runs an analyser on each and ties it
  together (the node's pipeline is passed in by ``dicom_node``: this package knows nothing of it).

See docs/validation.md.
"""

from __future__ import annotations

__all__: list[str] = []
