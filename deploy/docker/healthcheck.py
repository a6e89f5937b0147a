"""Container health probe for images without curl: exit 0 iff a local URL answers 200.

    python /opt/slmops/healthcheck.py <port> [path]      (path defaults to /healthz)

Used by the Dockerfiles' HEALTHCHECK (/healthz: the process answers), by compose (/readyz: NATS,
topology, consumers and the object store are ready) and by the Ray pods' probes.
"""

import sys
import urllib.error
import urllib.request


def main() -> int:
    port = int(sys.argv[1])
    path = sys.argv[2] if len(sys.argv) > 2 else "/healthz"
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (e.g. 503) is a URLError
        print(f"GET {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
