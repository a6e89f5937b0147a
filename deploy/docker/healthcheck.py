"""Container health probe for images without curl: exit 0 iff a local URL answers 200.

    python /opt/slmops/healthcheck.py [port] [path]      (path defaults to /healthz)

Without a port it probes the image's own service: SLMOPS_<SERVICE>_PORT, the service named by
SLMOPS_IMAGE_SERVICE (deploy/docker/Dockerfile sets both), so a port changed at run time is
followed. Used by the Dockerfile's HEALTHCHECK (/healthz: the process answers), by compose
(/readyz: NATS, topology, consumers and the object store are ready) and by the Ray pods' probes.
"""

import os
import sys
import urllib.error
import urllib.request


def own_port() -> int:
    service = os.environ["SLMOPS_IMAGE_SERVICE"]
    return int(os.environ[f"SLMOPS_{service.replace('-', '_').upper()}_PORT"])


def main(args: list[str]) -> int:
    port = int(args.pop(0)) if args and not args[0].startswith("/") else own_port()
    path = args[0] if args else "/healthz"
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (e.g. 503) is a URLError
        print(f"GET {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
