"""docs/codes.md is the code tables of sr_templates/codes.py, and every standard code in it has a source."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_codes_doc_is_current_and_every_standard_code_is_sourced() -> None:
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "codes_doc.py"), "--check"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr


def test_private_codes_are_only_where_no_standard_one_was_found() -> None:
    """The private scheme is declared, and its codes fit Code Value (16 characters)."""
    from sr_templates import codes as c

    private = [code for table in c._DEFAULTS for code in table.values() if c.is_private(code)]
    private += [v for v in vars(c.SpineCodes).values() if hasattr(v, "scheme_designator") and c.is_private(v)]
    assert all(len(code.value) <= 16 for code in private)
    assert [i.CodingSchemeDesignator for i in c.coding_scheme_identification()] == [c.SCHEME_DESIGNATOR]
