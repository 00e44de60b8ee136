"""Our per-level results in OHIF, on the images they describe: a real browser against ``ViewerStack``.

``spinemed-node viewer``'s stack (Orthanc + DICOMweb + our plugin, the node with the demo model, nginx
serving OHIF 3.13 from the npm registry) runs the demo: a synthetic lumbar MR goes through the plugin and
the node, and its TID 1500 SR comes back over STOW-RS.  A second SR, built by ``sr_templates`` from known
findings on the same study (three localised levels on one sagittal T2 slice and one level without a
point), is stored next to it.  Headless Chromium opens the study in OHIF and opens each SR:

* every localised level is drawn (one SVG annotation each) with the lines stock OHIF makes of a TID 1410
  group (its measurements, ``"Spinal canal anteroposterior diameter: 9.50 mm"``, and its finding site,
  ``"363698007: L4/L5 disc"``), derived from the SR itself, and no two labels overlap;
* the viewport shows the slice the SCOORDs reference (instance number in OHIF's overlay);
* the level without a point neither breaks the SR nor gets drawn.

Screenshots go to ``test-artifacts/viewer/``.  A missing browser, driver or OHIF download is a failure
with the command to fix it, never a skip.
"""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import REPO, free_port
from pydicom.uid import generate_uid

from dicom_node.devtools.viewer import ViewerError, ViewerStack, ensure_ohif
from inference.findings import (
    Evidence,
    ImagePlane,
    InputImage,
    LevelFinding,
    ModelAnswer,
    ModelIdentity,
    NarrativeReport,
    SpineFindings,
)
from inference.study import load_study
from sr_templates import build_outputs

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

ARTIFACTS = REPO / "test-artifacts" / "viewer"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: as the issue asks, plus an explicit opt-in to software WebGL (no GPU here; only our own pages load)
CHROME_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-unsafe-swiftshader",
    "--window-size=1600,1000",
]
KNOWN_SERIES = "SpineMed AI results (known findings)"
WAIT = 90.0  # generous: software WebGL on a 2-core machine
#: how long to wait for an opened SR's drawing before resizing the window (a re-render; see _wait_drawn)
RERENDER_AFTER = 15.0


# ---------------------------------------------------------------------------------------------- SR side
def _concept(item: pydicom.Dataset) -> str:
    code = item.ConceptNameCodeSequence[0]
    return f"{code.CodingSchemeDesignator}:{code.CodeValue}"


def expected_annotations(sr: pydicom.Dataset) -> list[dict[str, Any]]:
    """What stock OHIF 3.13 draws for a SpineMed TID 1500 SR, read from the SR's own structure.

    Each TID 1410 group (a finding localised at a point) is one annotation on the image its Image
    Region SCOORD references; OHIF labels it with one line per NUM (``"<concept>: <value to 2
    places> <UCUM code>"``) and one for the Finding Site (``"363698007: <site>"``), at most five.
    A TID 1501 group (no point) has nothing to draw.
    """
    out: list[dict[str, Any]] = []
    imaging = next((i for i in sr.ContentSequence if _concept(i) == "DCM:126010"), None)
    for group in imaging.ContentSequence if imaging is not None else []:
        items = list(group.ContentSequence)
        name = next(str(i.TextValue) for i in items if _concept(i) == "DCM:112039")
        scoord = next((i for i in items if i.ValueType == "SCOORD"), None)
        if scoord is None:
            out.append({"level": name, "lines": [], "image": None})
            continue
        lines = [
            f"{i.ConceptNameCodeSequence[0].CodeMeaning}: {float(i.MeasuredValueSequence[0].NumericValue):.2f} "
            f"{i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue}"
            for i in items if i.ValueType == "NUM"
        ]
        lines += [f"363698007: {i.ConceptCodeSequence[0].CodeMeaning}" for i in items if _concept(i) == "SCT:363698007"]
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        out.append({"level": name, "lines": lines[:5], "image": str(ref.ReferencedSOPInstanceUID)})
    return out


def _source_pixel(ds: pydicom.Dataset, lps: tuple[float, float, float]) -> tuple[float, float]:
    """Patient LPS mm → (column, row), SCOORD convention."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = [float(v) for v in ds.ImageOrientationPatient]
    dr, dc = (float(v) for v in ds.PixelSpacing)
    d = np.array(lps) - ipp
    return float(d @ np.array(iop[:3])) / dc + 0.5, float(d @ np.array(iop[3:])) / dr + 0.5


def known_findings_sr(paths: list[Path], centres: dict[str, tuple[float, float, float]]) -> pydicom.Dataset:
    """A TID 1500 SR from ``sr_templates``: L1 without a point; L3-L4, L4-L5, L5-S1 on the middle T2 slice."""
    study = load_study(paths)
    series = study.series[0]
    inst = series.instances[len(series.instances) // 2]
    ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
    image = InputImage(index=0, plane=ImagePlane.SAGITTAL, modality="MR",
                       series_instance_uid=series.series_instance_uid, sop_class_uid=str(ds.SOPClassUID),
                       sop_instance_uids=(str(ds.SOPInstanceUID),), rows=int(ds.Rows), columns=int(ds.Columns),
                       pixel_to_source=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0))

    def disc(upper: str, lower: str) -> Evidence:
        col, row = _source_pixel(ds, tuple((np.array(centres[upper]) + np.array(centres[lower])) / 2))
        return Evidence(image=0, x=round(col, 2), y=round(row, 2))

    levels = [
        LevelFinding(level="L1", finding="vertebral_fracture", severity="mild", evidence=[Evidence(image=0)]),
        LevelFinding(level="L3-L4", finding="disc_bulge", severity="mild", evidence=[disc("L3", "L4")]),
        LevelFinding(level="L4-L5", finding="disc_herniation", severity="moderate", laterality="left",
                     measurements=[{"type": "canal_ap_diameter", "value": 9.5}], evidence=[disc("L4", "L5")]),
        LevelFinding(level="L5-S1", finding="degenerative_disc_disease", severity="severe",
                     evidence=[disc("L5", "S1")]),
    ]
    findings = SpineFindings(
        study_instance_uid=study.study_instance_uid,
        model=ModelIdentity(name="SpineGPT", version="viewer-test", weights_digest="0" * 64, backend="demo",
                            prompt_version="p1", demo=False),
        task="structured_report",
        images=[image],
        answer=ModelAnswer(levels=levels, report=NarrativeReport(
            findings="L4-L5 left disc herniation.", diagnosis="L4-L5 disc herniation.",
            treatment_suggestions="-", risk_and_prognosis="-", follow_up="-", diagnostic_basis="Sagittal T2.")),
    )
    sr = build_outputs(study, findings)[0]
    # its own series (still ours for the plugin's loop guard: Manufacturer SpineMed, "SpineMed AI results")
    sr.SeriesInstanceUID = generate_uid()
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.SeriesDescription = KNOWN_SERIES
    return sr


# ---------------------------------------------------------------------------------------------- browser
def _require_browser() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: .venv/bin/pip install selenium")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).is_file():
            pytest.fail(f"{exe} missing: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Selenium Manager must not look for (or download) a driver: the Debian one is given explicitly
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    try:
        return ensure_ohif()
    except ViewerError as exc:
        pytest.fail(f"OHIF could not be installed from the npm registry: {exc}")


@pytest.fixture
def stack(tmp_path: Path, demo_model_dir: Path, ohif_dist: Path) -> Iterator[ViewerStack]:
    viewer = ViewerStack(workdir=tmp_path / "viewer", port=free_port(), model_dir=demo_model_dir,
                         ohif_dist=ohif_dist, stable_age=1)
    with viewer:
        yield viewer


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _require_browser()
    try:
        yield driver
    finally:
        driver.quit()


def _viewport_state(driver: Any) -> dict[str, Any]:
    """The active viewport: its annotation UIDs, its SVG label lines and boxes, its overlay text."""
    return driver.execute_script("""
        const uids = new Set(Array.from(document.querySelectorAll('svg [data-annotation-uid]'))
                              .map(e => e.getAttribute('data-annotation-uid')));
        const texts = Array.from(document.querySelectorAll('svg text')).map(t => {
            const r = t.getBoundingClientRect();
            const lines = Array.from(t.querySelectorAll('tspan')).map(s => s.textContent);
            return {lines: lines.length ? lines : [t.textContent], box: [r.left, r.top, r.right, r.bottom]};
        }).filter(t => t.lines.join('').trim());
        return {uids: Array.from(uids), texts: texts, overlay: document.body.innerText};
    """)


def _wait_for(driver: Any, what: str, check: Any, timeout: float = WAIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: check(d))
    except Exception as exc:
        _shot(driver, f"failed-{re.sub('[^a-z0-9]+', '-', what.lower())}")
        logs = "\n".join(str(e.get("message"))[:300] for e in driver.get_log("browser")[-25:])
        raise AssertionError(f"{what}: not seen in {timeout:.0f} s\n--- annotations and viewports:\n"
                             f"{_annotation_state(driver)}\n--- browser console:\n{logs}") from exc


def _annotation_state(driver: Any) -> Any:
    """What cornerstone holds (annotations, their images) and shows (each viewport's image), for a failure."""
    return driver.execute_script("""
        const ct = window.cornerstoneTools, cs = window.cornerstone;
        if (!ct || !cs) return 'cornerstone not on window';
        const anns = ct.annotation.state.getAllAnnotations().map(a => ({
            tool: a.metadata && a.metadata.toolName, image: a.metadata && a.metadata.referencedImageId,
            preview: a.isPreview, invalidated: a.invalidated, visible: a.isVisible}));
        const vps = cs.getRenderingEngines().flatMap(e => e.getViewports()).map(v => ({
            id: v.id, image: v.getCurrentImageId && v.getCurrentImageId()}));
        return JSON.stringify({annotations: anns, viewports: vps});
    """)


def _shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _sr_thumbnails(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return [e for e in driver.find_elements(By.CSS_SELECTOR, "[data-cy='study-browser-thumbnail-no-image']")
            if e.text.startswith("SR")]


def _open(driver: Any, thumbnail: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).double_click(thumbnail).perform()


def _instance_number(orthanc: ViewerStack, sop_uid: str) -> int:
    hits = orthanc.orthanc("POST", "/tools/lookup", sop_uid.encode())
    inst = next(h for h in hits if h["Type"] == "Instance")
    return int(orthanc.orthanc("GET", f"/instances/{inst['ID']}")["MainDicomTags"]["InstanceNumber"])


def _on_shown_image(expected: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """OHIF opens an SR on its first localised measurement's image: that image and the levels on it."""
    localised = [e for e in expected if e["image"] is not None]
    image = localised[0]["image"]
    return image, [e for e in localised if e["image"] == image]


def _drawn(driver: Any, expected: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The viewport state once exactly the expected levels of the shown image are drawn, else None."""
    _, on_image = _on_shown_image(expected)
    want = sorted(line for e in on_image for line in e["lines"])
    st = _viewport_state(driver)
    got = sorted(line for t in st["texts"] for line in t["lines"])
    return st if got == want and len(st["uids"]) == len(on_image) else None


def _wait_drawn(driver: Any, what: str, check: Any) -> Any:
    """Wait for an opened SR's drawing, resizing the window by a pixel when none comes.

    Stock OHIF 3.13 has a race (its ``OHIFCornerstoneSRMeasurementViewport``): the SR's tracking identifiers
    are given to the viewport's element in a React effect that triggers no render, and its
    ``DICOMSRDisplayTool`` draws only annotations whose identifier the element holds.  When the image's
    last render comes before that effect (a slow, loaded machine), the annotations stay in cornerstone's
    state, on the shown image, undrawn, until the viewport next renders: a scroll, a window/level drag, a
    resize.  Seen in CI and reproduced under CPU load (the annotation state, dumped on failure, held all
    three on the image shown).  A one-pixel window resize is that next render for the user and changes
    neither the slice nor the data; everything after it is checked as before.
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    deadline = time.monotonic() + WAIT
    while time.monotonic() + RERENDER_AFTER < deadline:
        try:
            return WebDriverWait(driver, RERENDER_AFTER, poll_frequency=0.25).until(lambda d: check(d))
        except TimeoutException:
            size = driver.get_window_size()
            driver.set_window_size(size["width"] + (1 if size["width"] % 2 == 0 else -1), size["height"])
            print(f"{what}: not drawn in {RERENDER_AFTER:.0f} s, the window resized by a pixel (OHIF 3.13 race)")
    return _wait_for(driver, what, check, timeout=max(1.0, deadline - time.monotonic()))


def _check_drawn(driver: Any, stack: ViewerStack, expected: list[dict[str, Any]], name: str,
                 state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Wait until every localised level of ``expected`` on the shown image is drawn; check the image."""
    image, on_image = _on_shown_image(expected)
    if state is None:
        want = sorted(line for e in on_image for line in e["lines"])
        state = _wait_drawn(driver, f"{name}: labels {want}", lambda d: _drawn(d, expected))
    number = _instance_number(stack, image)
    match = re.search(r"I:\s*(\d+)\s*\(", state["overlay"])
    assert match is not None, f"no instance number in OHIF's overlay: {state['overlay']!r}"
    assert int(match.group(1)) == number, "the annotations are not on the slice the SCOORDs reference"
    boxes = [t["box"] for t in state["texts"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"labels overlap: {state['texts']}"
    # nothing else is drawn: the lines are exactly those of the levels on this image (checked by _drawn)
    return state


def _text_report_shown(driver: Any) -> bool:
    """OHIF's SR text viewport (what it shows for the narrative SR) is on screen."""
    return bool(driver.execute_script(
        "const e = document.querySelector('div.text-foreground.overflow-auto.p-4');"
        "return !!e && e.innerText.trim().length > 0;"))


# ---------------------------------------------------------------------------------------------- the test
def test_ohif_draws_our_levels_on_their_images(stack: ViewerStack, browser: Any) -> None:
    t0 = time.monotonic()
    demo, status = stack.load_demo(slices=7, size=192, timeout=180)
    assert status == "spinemed-done"
    study_uid = demo.study_instance_uid
    study_id = stack.orthanc("POST", "/tools/lookup", study_uid.encode())[0]["ID"]
    demo_sr = None
    for inst in stack.orthanc("GET", f"/studies/{study_id}/instances"):
        if stack.orthanc("GET", f"/instances/{inst['ID']}/metadata/SopClassUid") == "1.2.840.10008.5.1.4.1.1.88.34":
            demo_sr = pydicom.dcmread(io.BytesIO(_raw(stack, f"/instances/{inst['ID']}/file")))
    assert demo_sr is not None, "the node's TID 1500 SR is not in Orthanc"
    demo_expected = expected_annotations(demo_sr)

    known = known_findings_sr(list(demo.paths), demo.vertebra_centres)
    known_path = stack.workdir / "known-sr.dcm"
    known.save_as(known_path, enforce_file_format=True)
    stack.upload([known_path])
    known_expected = expected_annotations(known)
    assert [e["level"] for e in known_expected if e["image"]] == [
        "L3-L4 disc bulge", "L4-L5 disc herniation", "L5-S1 degenerative disc disease"]

    # the study in OHIF: series thumbnails, our SRs among them
    browser.get(stack.study_url(study_uid))
    _wait_for(browser, "the study's SR thumbnails", lambda d: len(_sr_thumbnails(d)) >= 3)
    _shot(browser, "study")

    # the known SR: three levels on one slice, readable, apart; L1 (no point) is not drawn
    thumb = next(t for t in _sr_thumbnails(browser) if "known findings" in t.text)
    _open(browser, thumb)
    state = _check_drawn(browser, stack, known_expected, "known-findings SR")
    assert "363698007: L4/L5 disc" in [ln for t in state["texts"] for ln in t["lines"]]
    _shot(browser, "known-findings-sr")

    # the node's own SR (demo model: random findings, but what the SR says must be on screen); the
    # study's other SR is the narrative one, which OHIF shows as text
    if any(e["image"] for e in demo_expected):
        drawn_demo = None
        for thumb in [t for t in _sr_thumbnails(browser) if "known findings" not in t.text]:
            _open(browser, thumb)
            shown = _wait_drawn(browser, "an SR opened (drawn or as text)",
                              lambda d: _drawn(d, demo_expected) or ("text" if _text_report_shown(d) else None))
            if shown != "text":
                drawn_demo = _check_drawn(browser, stack, demo_expected, "the node's demo SR", shown)
                break
        assert drawn_demo is not None, f"the node's SR was not drawn: {demo_expected}"
        _shot(browser, "demo-sr")
    assert time.monotonic() - t0 < 240


def _raw(stack: ViewerStack, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.orthanc_http}{path}", timeout=30) as resp:
        return bytes(resp.read())


# ---------------------------------------------------------------------------------------------- fast checks
def test_nginx_config_renders_and_nginx_accepts_it(tmp_path: Path) -> None:
    import subprocess

    from dicom_node.devtools.viewer import NGINX, VIEWER_DIR, render_nginx_conf

    run = tmp_path / "run"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run / "nginx-tmp" / sub).mkdir(parents=True)
    (tmp_path / "ohif").mkdir()
    conf = run / "nginx.conf"
    conf.write_text(render_nginx_conf(listen="127.0.0.1:9", ohif=tmp_path / "ohif",
                                      app_config=VIEWER_DIR / "app-config.js", orthanc_port=8042, run=run))
    assert "{{" not in conf.read_text()
    res = subprocess.run([NGINX, "-t", "-p", str(run), "-e", str(run / "e.log"), "-c", str(conf)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_ohif_pin_is_exact() -> None:
    from dicom_node.devtools.viewer import ohif_pin

    pin = ohif_pin()
    assert pin.package == "@ohif/app" and re.fullmatch(r"3\.13\.\d+", pin.version)
    assert pin.integrity.startswith("sha512-")


def test_without_npm_the_message_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ViewerError, match=r"npm pack @ohif/app@3\.13\.\d+` failed .*npm registry"):
        ensure_ohif(tmp_path / "cache", npm="/bin/false")
    assert not any((tmp_path / "cache").glob("@ohif+app-*")), "nothing half-installed"


def test_a_tarball_that_does_not_match_the_pin_is_refused(tmp_path: Path, ohif_dist: Path) -> None:
    from dicom_node.devtools.viewer import OhifPin, ohif_pin

    pin = ohif_pin()
    wrong = OhifPin(pin.package, pin.version, "sha512-" + "A" * 86 + "==")
    with pytest.raises(ViewerError, match="does not match the pin"):
        ensure_ohif(tmp_path / "cache", pin=wrong)  # npm's own cache serves the tarball again


def test_cli_has_the_viewer_command() -> None:
    from dicom_node.cli import build_parser

    args = build_parser().parse_args(["viewer", "--demo", "--port", "8801"])
    assert (args.demo, args.port, args.host, args.storage) == (True, 8801, "127.0.0.1", None)
