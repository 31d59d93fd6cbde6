"""Docker HEALTHCHECK: exit 0 when GET /health answers 200 (no curl in slim images; standard library only)."""

import os
import sys
import urllib.request

port = os.environ.get("INSIGHTAD_PORT", "8080")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except Exception as e:  # noqa: BLE001 - any failure means unhealthy
    print(f"healthcheck: {e}", file=sys.stderr)
    sys.exit(1)
