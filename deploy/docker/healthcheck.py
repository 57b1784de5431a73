"""Container HEALTHCHECK: GET /healthz on the service's own HTTP port (no curl in the image).

Uses https (certificate not verified: it is loopback) when EPLB_TLS_CERT is set. Kubernetes
ignores HEALTHCHECK and uses the chart's probes instead; this is for `docker run` and Compose.
"""

import os
import ssl
import sys
import urllib.request

port = os.environ.get("EPLB_HTTP_PORT", "8080")
scheme = "https" if os.environ.get("EPLB_TLS_CERT") else "http"
context = ssl._create_unverified_context() if scheme == "https" else None  # noqa: S323
try:
    with urllib.request.urlopen(
        f"{scheme}://127.0.0.1:{port}/healthz", timeout=3, context=context
    ) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # any failure is "unhealthy"
    print(f"healthcheck: {exc}", file=sys.stderr)
    sys.exit(1)
