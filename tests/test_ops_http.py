"""The HTTP side: /health/live, /health/ready, /metrics, and the jobs page in a real headless Chromium.

One in-process node (listener + worker thread with the demo model) analyses one study and delivers it to a dcmtk
storescp; then the endpoints are read over HTTP and the jobs page is driven by Debian's chromium + chromedriver
through selenium: the job's row is there, its report link opens the SR rendered by dsr2html.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import StoreSCP, start_storescp, storescu

from dicom_node.config import load_config
from dicom_node.devtools.phantoms import SyntheticStudy, make_lumbar_mr
from dicom_node.jobs.model import JobState
from dicom_node.log import phi_hash
from dicom_node.node import ReceivingNode
from dicom_node.work.pipeline import Pipeline
from dicom_node.work.worker import Worker

pytestmark = pytest.mark.slow


@dataclass
class Running:
    node: ReceivingNode
    scp: StoreSCP
    study: SyntheticStudy
    base: str
    worker: Worker


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("http")
    scp = start_storescp(tmp)
    cfg = load_config(
        node={"port": 0, "host": "127.0.0.1", "data_dir": tmp / "data", "min_free_disk_mb": 0},
        http={"port": 0, "ready_cache_s": 0.2},
        # quiet long enough that a slow disk (an instance acknowledged, its row committed ~0.2 s later) never
        # splits the five slices into two revisions: the metrics below count one analysis
        completeness={"quiet_seconds": 1.0, "force_seconds": 60, "check_interval_s": 0.1},
        model={"backend": "demo", "path": str(demo_model_dir)},
        worker={"poll_interval_s": 0.05},
        output={"pdf": True},
        destinations=[{"name": "results", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}],
    )
    node = ReceivingNode(cfg)
    node.start()
    worker = Worker(cfg, node.store, pipeline=Pipeline(cfg))
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    study = make_lumbar_mr(tmp / "mr", slices=5, size=96, seed=5, patient_id="HTTP-PAT-4711")
    assert storescu(node.receiver.port, list(study.paths)).returncode == 0
    assert node.receiver.flush(), "acknowledged instances recorded"
    deadline = time.monotonic() + 180
    while node.store.by_study(study.study_instance_uid).state is not JobState.DONE:
        assert time.monotonic() < deadline, node.store.by_study(study.study_instance_uid)
        time.sleep(0.1)
    job = node.store.by_study(study.study_instance_uid)
    assert (job.revision, job.instance_count) == (1, len(study.paths)), node.store.events(study.study_instance_uid)
    yield Running(node, scp, study, f"http://127.0.0.1:{node.ops.http_port}", worker)
    worker.stop()
    thread.join(timeout=30)
    node.stop()
    scp.proc.terminate()
    scp.proc.wait(timeout=10)


def test_live_and_ready(running: Running) -> None:
    assert httpx.get(f"{running.base}/health/live").json() == {"status": "alive"}
    r = httpx.get(f"{running.base}/health/ready", timeout=20)
    body = r.json()
    assert r.status_code == 200, body
    assert set(body["checks"]) == {"store", "disk", "worker", "destination:results"}
    assert "demo model" in body["checks"]["worker"]["detail"]
    assert body["checks"]["destination:results"]["detail"] == "C-ECHO success"


def test_metrics(running: Running) -> None:
    r = httpx.get(f"{running.base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    n = len(running.study.paths)
    objects = len(running.node.store.outputs(running.study.study_instance_uid))  # SRs, key image, its KO, PDF
    assert objects == 5
    for line in (f"spinemed_instances_received_total {float(n)}", 'spinemed_studies{state="done"} 1.0',
                 "spinemed_queue_depth 0.0", "spinemed_inference_seconds_count 1.0",
                 'spinemed_inference_seconds_bucket{le="+Inf"} 1.0', f"spinemed_export_delivered_total {objects:.1f}",
                 "spinemed_export_failures_total 0.0", "spinemed_worker_model_loaded 1.0",
                 "spinemed_associations_accepted_total", f"spinemed_instances_received_in_slots_total {float(n)}",
                 "spinemed_receive_slots_unsettled 0.0", "spinemed_instances_spilled_total 0.0"):
        assert line in text, line
    assert running.study.study_instance_uid not in text


def test_ready_turns_503_when_a_destination_is_down(running: Running, tmp_path: Path) -> None:
    running.scp.proc.terminate()
    running.scp.proc.wait(timeout=10)
    try:
        time.sleep(0.3)  # past ready_cache_s
        r = httpx.get(f"{running.base}/health/ready", timeout=20)
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert not checks["destination:results"]["ok"] and checks["store"]["ok"] and checks["worker"]["ok"]
    finally:
        new = start_storescp(tmp_path, port=running.scp.port)
        running.scp.proc, running.scp.dir = new.proc, new.dir
    time.sleep(0.3)
    assert httpx.get(f"{running.base}/health/ready", timeout=20).status_code == 200


def _chrome() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    exe, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if exe is None or driver is None:
        pytest.fail("Debian chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_jobs_page_in_headless_chromium(running: Running, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    browser = _chrome()
    assert isinstance(browser, WebDriver)
    try:
        browser.get(f"{running.base}/")  # redirects to /jobs
        job = running.node.store.by_study(running.study.study_instance_uid)
        row = browser.find_element(By.ID, f"job-{job.id}")
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == str(job.id) and cells[1] == phi_hash(running.study.study_instance_uid)
        assert cells[2] == "done" and cells[4] == str(len(running.study.paths))
        assert cells[7].endswith(" s"), "inference time is shown"
        browser.save_screenshot(str(tmp_path / "jobs.png"))
        page = browser.page_source
        ds = pydicom.dcmread(running.study.paths[0], stop_before_pixels=True)
        for phi in (str(ds.PatientID), str(ds.PatientName), running.study.study_instance_uid):
            assert phi not in page, "no patient identifiers on the jobs page"
        link = row.find_element(By.CSS_SELECTOR, 'a.report[href$="/measurement_report"]')
        link.click()
        assert browser.current_url.endswith(f"/jobs/{job.id}/report/measurement_report")
        report = browser.find_element(By.TAG_NAME, "body").text
        assert "Comprehensive 3D SR" in browser.title or "Imaging Measurement Report" in report, browser.title
        assert str(ds.PatientID) in report, "the rendered report is the clinical document"
        browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()


def test_the_jobs_page_opens_the_pdf_report(running: Running) -> None:
    """The PDF report is linked from the job's row and served as the PDF itself (application/pdf)."""
    job = running.node.store.by_study(running.study.study_instance_uid)
    page = httpx.get(f"{running.base}/jobs", timeout=20).text
    assert f'href="/jobs/{job.id}/report/pdf_report"' in page
    r = httpx.get(f"{running.base}/jobs/{job.id}/report/pdf_report", timeout=20)
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
    assert r.content.startswith(b"%PDF-") and r.content.rstrip().endswith(b"%%EOF")
    assert httpx.get(f"{running.base}/jobs/{job.id}/report/key_image", timeout=20).status_code == 404
