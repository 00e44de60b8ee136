"""A Storage SCP that takes ``DELAY_MS`` per C-STORE: a PACS across a network, for benchmarks/load.py.

    python benchmarks/slow_scp.py PORT DELAY_MS
"""

from __future__ import annotations

import sys
import time
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt


def main() -> int:
    port, delay_s = int(sys.argv[1]), float(sys.argv[2]) / 1000.0

    def store(event: Any) -> int:
        time.sleep(delay_s)
        return 0x0000

    ae = AE(ae_title="SPINEMED")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_associations = 64
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, store)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
