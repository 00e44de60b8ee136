"""What auditing each received instance *before* its C-STORE Success would cost, measured on this disk.

The node acknowledges an instance once its bytes are fsynced into the spool; its audit line follows in
the indexer's next batch (one audit fsync per batch, every 50 ms), and an instance acknowledged just before
a crash is audited as ``recovered`` at the next start.  The alternative — a durable audit line before
Success — adds one more fsync to every instance of a single association (concurrent associations share
it: group commit).  This prints both, per instance, and their ratio, in one process:

    .venv/bin/python benchmarks/audit_cost.py [--instances 2000] [--dir /var/lib/spinemed-node]

``--dir`` should be on the disk the node's data_dir uses (fsync cost is the disk's).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from dicom_node.ops.audit import AuditTrail

FIELDS = {"calling_ae": "STORESCU", "peer_ip": "10.0.0.7", "study": "3f2a9c1b7d21", "sop": "9b1c2d3e4f50",
          "status": "0x0000", "outcome": "stored"}


def _spool_like_fsync(folder: Path, n: int) -> float:
    """Per instance: write 512 KiB (an MR slice) and fdatasync it — what the node already pays."""
    data = os.urandom(512 * 1024)
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(folder / f"i{i % 16}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    return (time.perf_counter() - t0) / n


def _audit(folder: Path, n: int, durable: bool) -> float:
    trail = AuditTrail(folder / f"audit-{int(durable)}.jsonl", flush_interval_s=0.05)
    t0 = time.perf_counter()
    for _ in range(n):
        trail.record("instance_received", durable=durable, **FIELDS)
    per = (time.perf_counter() - t0) / n
    trail.close()
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        n = args.instances
        spool = _spool_like_fsync(folder, n // 4)
        batched = _audit(folder, n, durable=False)
        durable = _audit(folder, n, durable=True)
    print(f"spool write + fdatasync per instance (512 KiB): {spool * 1e3:.3f} ms  (reference)")
    print(f"audit line, batched (the node today):           {batched * 1e3:.3f} ms  ratio {batched / spool:.3f}")
    print(f"audit line, fsynced before Success:              {durable * 1e3:.3f} ms  ratio {durable / spool:.3f}")
    print(f"one association's instance would cost {(spool + durable) / (spool + batched):.2f}x the node's own "
          "durability work with a durable audit line")


if __name__ == "__main__":
    main()
