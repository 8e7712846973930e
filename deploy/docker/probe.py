#!/usr/bin/env python3
"""Container health check: `lorafleet-probe PORT [PATH]` exits 0 when http://127.0.0.1:PORT/PATH (default /healthz)
answers 2xx, else 1 with the answer or the error on one line (Docker shows it in `docker inspect`). The images have no
curl; this is the standard library only."""

import sys
import urllib.error
import urllib.request


def main() -> None:
    if len(sys.argv) not in (2, 3) or not sys.argv[1].isdigit():
        sys.exit("usage: lorafleet-probe PORT [/healthz|/readyz]")
    url = f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2] if len(sys.argv) == 3 else '/healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            print(f"{url}: {answer.status}")
    except urllib.error.HTTPError as exc:  # 503 from /readyz names its reason in the body
        sys.exit(f"{url}: {exc.code} {exc.read(200).decode(errors='replace').strip()}")
    except OSError as exc:
        sys.exit(f"{url}: {exc}")


if __name__ == "__main__":
    main()
