"""``spinemed-node``: the one command-line entry point."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dicom_node import __version__
from dicom_node.config import NodeConfig, load_config
from dicom_node.errors import ConfigError, NodeError
from dicom_node.log import configure_logging

__all__ = ["main"]


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_config(getattr(args, "config", None))


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("SPINEMED_CONFIG"),
        help="TOML config file (default: $SPINEMED_CONFIG, else embedded defaults)",
    )


# ---------------------------------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.node import run_serve

    return run_serve(_config(args), args.config, ready_file=args.ready_file)


def cmd_receive(args: argparse.Namespace) -> int:
    import signal
    import threading

    from dicom_node.node import ReceivingNode

    node = ReceivingNode(_config(args))
    node.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    node.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.node import run_worker

    parent = os.environ.get("SPINEMED_PARENT_PID")
    return run_worker(_config(args), parent_pid=int(parent) if parent else None)


def cmd_recover_slots(args: argparse.Namespace) -> int:
    from dicom_node.ingest.receive import recover_host
    from dicom_node.jobs.stores import open_store

    config = _config(args)
    store = open_store(config)
    try:
        r = recover_host(config, store, args.host, retire=args.retire)
    except ValueError as exc:
        print(f"spinemed-node: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"{args.host}: {r.settled} acknowledged instances settled from its receive slots, "
          f"{r.recorded} recorded in the job store" + (f", {r.retired} slots removed" if args.retire else ""))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dicom_node.work.pipeline import Pipeline, output_kind
    from dicom_node.work.worker import write_dataset_atomic
    from inference.study import load_study

    config = _config(args)
    if args.data_dir is not None:
        config.node.data_dir = args.data_dir
    study = load_study(args.paths)
    pipeline = Pipeline(config)
    try:
        outcome = pipeline.run(study)
    finally:
        pipeline.close()
    args.out.mkdir(parents=True, exist_ok=True)
    if outcome.skipped_reason:
        print(f"skipped: {outcome.skipped_reason}")
        return 3
    assert outcome.findings is not None
    (args.out / "findings.json").write_text(outcome.findings.model_dump_json(indent=2))
    for ds in outcome.datasets:
        path = args.out / f"{output_kind(ds)}-{ds.SOPInstanceUID}.dcm"
        write_dataset_atomic(ds, path)
        print(path)
    levels = ", ".join(f"{f.level} {f.finding.value} ({f.severity.value})" for f in outcome.findings.levels)
    print(f"levels: {levels or '(none reported)'}")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in outcome.seconds.items()))
    if outcome.findings.model.demo:
        print("demo model — not for clinical use")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from dicom_node.work.validate import run_validation
    from inference.errors import InferenceError
    from inference.validation.labels import LabelError

    config = _config(args)
    if args.data_dir is not None:
        config.node.data_dir = args.data_dir
    # highdicom logs every module it copies into each SR at INFO: noise around the progress bar here
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    try:
        result = run_validation(config, args.cases, args.labels, args.out, labels_format=args.labels_format,
                                resamples=args.resamples, seed=args.seed, progress=not args.no_progress)
    except (LabelError, ValueError, InferenceError) as exc:
        print(f"spinemed-node: validate: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, InferenceError) else 1
    m = result.metrics
    st = m["studies"]
    if m["demo"]:
        print("demo model — not for clinical use")
    print(f"studies: {st['analysed']} analysed of {st['found']} found ({st['labelled']} labelled)")
    for name, c in m["conditions"].items():
        if not c["assessed"]:
            print(f"{name}: not assessed by the model ({c['cells']} cells)")
            continue
        a = c["all_levels"]
        print(f"{name}: sensitivity {_value(a['sensitivity'])}, specificity {_value(a['specificity'])}, "
              f"kappa {_value(c['quadratic_weighted_kappa'])} ({c['cells']} cells)")
    print(f"level identification {_value(m['level_identification_accuracy'])}, localisation mean "
          f"{_value(m['localisation_mm']['mean'])} mm, Cobb MAE {_value(m['cobb']['mae_deg'])} deg, "
          f"SMAPE {_value(m['cobb']['smape_percent'])} %")
    ll = m["log_loss"]
    print(f"log loss: {_value(ll['score']) if ll['available'] else ll['reason']}")
    print(f"written: {args.out / 'report.html'}, metrics.json, cases.csv")
    return 0


def _value(est: dict[str, object]) -> str:
    value, ci = est.get("value"), est.get("ci95")
    if not isinstance(value, float | int):
        return "n/a"
    text = f"{value:.3f}"
    if isinstance(ci, list):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicom_node.jobs.model import JobState
    from dicom_node.jobs.stores import open_store

    config = _config(args)
    if config.store.url is None and not config.db_path.exists():
        print(f"no job store at {config.db_path}", file=sys.stderr)
        return 1
    store = open_store(config)
    try:
        if args.action == "list":
            states = [JobState(s) for s in args.state] if args.state else []
            rows = store.jobs(states)
            if args.json:
                print(json.dumps([_job_dict(j) for j in rows], indent=2))
            else:
                print(f"{'id':>5}  {'state':<10} {'rev':>3} {'inst':>5}  {'updated':<19}  reason")
                for j in rows:
                    upd = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.updated_at))
                    print(
                        f"{j.id:>5}  {j.state.value:<10} {j.revision:>3} {j.instance_count:>5}  {upd}  {j.reason or ''}"
                    )
        elif args.action == "show":
            job = store.get(args.id)
            d = _job_dict(job)
            d["outputs"] = [o.__dict__ for o in store.outputs(job.study_instance_uid)]
            d["deliveries"] = [x.__dict__ for x in store.deliveries(job.study_instance_uid)]
            d["events"] = store.events(job.study_instance_uid)
            d["excluded_instances"] = [
                {"sop_instance_uid": i.sop_instance_uid, "series_instance_uid": i.series_instance_uid,
                 "reason": i.unusable_reason}
                for i in store.instances(job.study_instance_uid) if i.unusable_reason
            ]
            print(json.dumps(d, indent=2, default=str))
        elif args.action == "retry":
            job = store.retry(args.id)
            print(f"job {job.id}: {job.state.value}")
    finally:
        store.close()
    return 0


def _job_dict(j: object) -> dict[str, object]:
    from dataclasses import asdict

    d = asdict(j)  # type: ignore[call-overload]
    d["state"] = str(d["state"])
    return d  # type: ignore[no-any-return]


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.config import DestinationConfig
    from dicom_node.delivery.dispatch import check

    config = _config(args)
    if args.host:
        targets = [DestinationConfig(name="cli", ae_title=args.ae_title, host=args.host, port=args.port)]
    elif args.destination:
        targets = [d for d in config.destinations if d.name == args.destination]
        if not targets:
            raise ConfigError(f"destinations: no destination named {args.destination!r}")
    else:
        targets = list(config.destinations)
        if not targets:
            targets = [
                DestinationConfig(
                    name="self",
                    ae_title=config.node.ae_title,
                    host="127.0.0.1",
                    port=config.node.port or 11112,
                )
            ]
    rc = 0
    for t in targets:
        ok, msg = check(t, calling_ae=config.node.ae_title)
        where = {"dicomweb": t.url, "fhir": t.url, "hl7": f"MLLP {t.host}:{t.port}"}.get(
            t.type, f"{t.ae_title}@{t.host}:{t.port}")
        print(f"{t.name} ({where}): {msg}")
        rc |= 0 if ok else 1
    return rc


def cmd_render_message(args: argparse.Namespace) -> int:
    """Print the HL7 ORU^R01 or FHIR Bundle a destination would be sent for one report (nothing is sent)."""
    from dicom_node.delivery.fhir import build_report_bundle
    from dicom_node.delivery.hl7 import build_oru, report_pair

    files = [f for p in args.paths for f in (sorted(p.glob("*.dcm")) if p.is_dir() else [p])]
    try:
        measurement, narrative = report_pair(files)
        if args.kind == "hl7":
            print(build_oru(measurement, narrative).replace("\r", "\n"))
        else:
            bundle = build_report_bundle(measurement, narrative,
                                         patient_identifier_system=args.patient_identifier_system)
            print(json.dumps(bundle, indent=2, ensure_ascii=False))
    except (OSError, ValueError) as exc:
        print(f"render-message: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_build_demo_model(args: argparse.Namespace) -> int:
    from inference.demo_model import build_demo_model

    path = build_demo_model(args.dir, seed=args.seed)
    print(f"{path} (demo — not for clinical use)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dicom_node.devtools.demo import run_demo

    return run_demo(
        workdir=args.workdir, kind=args.kind, keep_running=args.keep_running, model_dir=args.model_dir
    )


def cmd_orthanc_config(args: argparse.Namespace) -> int:
    from dicom_node.ops.orthanc_config import node_destination_toml, orthanc_config

    config = _config(args)
    snippet = orthanc_config(
        config,
        node_host=args.node_host,
        modality_name=args.modality,
        plugin_dir=args.plugin_dir,
        state_file=args.state_file,
        node_url=args.node_url,
    )
    print(json.dumps(snippet, indent=2))
    print(
        "# add to the node's configuration, to send results back to this Orthanc:\n"
        + node_destination_toml(url=args.orthanc_url),
        file=sys.stderr,
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from dicom_node.ops.doctor import print_report, run_doctor

    results = run_doctor(_config(args), args.config, skip_echo=args.no_echo)
    return print_report(results)


def cmd_viewer(args: argparse.Namespace) -> int:
    from dicom_node.devtools.viewer import run_viewer

    return run_viewer(port=args.port, host=args.host, demo=args.demo, storage=args.storage,
                      workdir=args.workdir, model_dir=args.model_dir)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"spinemed-node {__version__}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinemed-node",
        description="On-premise DICOM node: spine studies in, per-level DICOM Structured Reports out.",
    )
    parser.add_argument("--log-level", default=os.environ.get("SPINEMED_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the listener and the worker (the normal service)")
    _add_config(p)
    p.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("receive", help="run only the listener and completeness monitor (systemd split)")
    _add_config(p)
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("worker", help="run only the worker: load the model once, work the job queue")
    _add_config(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("recover-slots",
                       help="settle the receive slots of a receiver host gone for good (shared spool)")
    _add_config(p)
    p.add_argument("host", help="the host name whose slots to settle (a folder under <spool>/.slots/)")
    p.add_argument("--retire", action="store_true", help="then remove that host's slots from disk")
    p.set_defaults(func=cmd_recover_slots)

    p = sub.add_parser("analyze", help="run the whole pipeline on files, no network; write results to --out")
    _add_config(p)
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders of one study")
    p.add_argument("--out", type=Path, required=True, help="folder for the SR objects and findings.json")
    p.add_argument("--data-dir", type=Path, help="where models are built/cached (default: node.data_dir)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("validate", help="measure the model on a site's labelled cases: report.html, "
                                        "metrics.json, cases.csv (docs/validation.md)")
    _add_config(p)
    p.add_argument("cases", type=Path, help="folder of DICOM studies (one sub-folder per study, or any tree)")
    p.add_argument("--labels", type=Path, required=True,
                   help="RSNA 2024 folder or train.csv, our per-level CSV, or a TID 1500 SR (file or folder)")
    p.add_argument("--labels-format", choices=["auto", "rsna", "csv", "sr"], default="auto")
    p.add_argument("--out", type=Path, required=True, help="folder for report.html, metrics.json, cases.csv")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--data-dir", type=Path, help="where models are built/cached (default: node.data_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("demo", help="node + synthetic study over DICOM → SR written and shown (demo model)")
    p.add_argument("--workdir", type=Path, default=Path(".demo"), help="demo data folder (default: ./.demo)")
    p.add_argument("--kind", choices=["mr", "ct", "xr"], default="mr", help="synthetic study to send")
    p.add_argument("--keep-running", action="store_true", help="leave the node running after the demo")
    p.add_argument(
        "--model-dir", type=Path, help="demo model folder (built if missing; default: WORKDIR/models/demo)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("jobs", help="list, show or retry jobs")
    jsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = jsub.add_parser("list", help="one line per job")
    q.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    q.add_argument("--json", action="store_true")
    q = jsub.add_parser("show", help="one job with its outputs, deliveries and history")
    q.add_argument("id", type=int)
    q = jsub.add_parser("retry", help="bring a failed or skipped job back")
    q.add_argument("id", type=int)
    for q in jsub.choices.values():
        _add_config(q)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("echo", help="check the configured destinations answer: C-ECHO, MLLP connect, FHIR "
                                    "metadata (or --host/--port: C-ECHO)")
    _add_config(p)
    p.add_argument("--destination", help="only this configured destination")
    p.add_argument("--host")
    p.add_argument("--port", type=int, default=104)
    p.add_argument("--ae-title", default="ANY-SCP")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser(
        "render-message",
        help="print the HL7 ORU^R01 or FHIR Bundle of one report (its SR files or folder); nothing is sent",
    )
    p.add_argument("kind", choices=["hl7", "fhir"])
    p.add_argument("paths", type=Path, nargs="+", help="the report's SR files, or a folder holding them")
    p.add_argument("--patient-identifier-system", help="fhir: the Patient IDs' identifier system (a URI)")
    p.set_defaults(func=cmd_render_message)

    p = sub.add_parser(
        "build-demo-model", help="build the tiny random demo model (demo — not for clinical use)"
    )
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_demo_model)

    p = sub.add_parser(
        "orthanc-config", help="print the Orthanc configuration that connects Orthanc to this node"
    )
    _add_config(p)
    p.add_argument(
        "--node-host", help="address Orthanc uses to reach this node (default: node.host or 127.0.0.1)"
    )
    p.add_argument("--modality", default="spinemed", help="the node's key in Orthanc's DicomModalities")
    p.add_argument("--plugin-dir", type=Path, default=Path("/usr/share/orthanc/plugins"))
    p.add_argument(
        "--state-file", type=Path, help="the plugin's state file (default: next to Orthanc's index)"
    )
    p.add_argument(
        "--node-url",
        help="the node's HTTP root as Orthanc reaches it: the plugin reads the node's status over its API "
        "instead of its job store file (Orthanc on another host; default for a PostgreSQL job store)",
    )
    p.add_argument(
        "--orthanc-url",
        default="http://127.0.0.1:8042/dicom-web",
        help="Orthanc's DICOMweb root, for the suggested result destination",
    )
    p.set_defaults(func=cmd_orthanc_config)

    p = sub.add_parser("doctor", help="check an installation: config, data dir, disk, ports, destinations, GPU, model")
    _add_config(p)
    p.add_argument("--no-echo", action="store_true", help="do not C-ECHO the destinations")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("viewer", help="Orthanc + node + OHIF on one port: our SRs drawn on their images")
    p.add_argument("--demo", action="store_true", help="also load a synthetic lumbar MR and wait for its SR")
    p.add_argument("--port", type=int, default=8800, help="the viewer's HTTP port (default: 8800)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--storage", type=Path, help="Orthanc storage folder to use (default: temporary)")
    p.add_argument("--workdir", type=Path, help="configs, logs, node data (default: temporary)")
    p.add_argument("--model-dir", type=Path, help="demo model folder (built if missing)")
    p.set_defaults(func=cmd_viewer)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"spinemed-node: {exc}", file=sys.stderr)
        return 2
    except NodeError as exc:
        print(f"spinemed-node: {exc}", file=sys.stderr)
        return 1
