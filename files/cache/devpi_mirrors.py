"""Create or update devpi-server's mirror indexes: devpi_mirrors.py BASE PASSWORD_FILE INDEX=URL ...

Run on the cache host by deploys/cache.py with devpi's own Python; waits up to 60 s for the server to answer,
logs in as root (password from PASSWORD_FILE) and sets each index's mirror_url (PUT if new, PATCH if not).
"""

import base64
import json
import sys
import time
import urllib.error
import urllib.request


def call(method: str, url: str, body: object = None, auth: str | None = None) -> dict:
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    if auth:
        headers["X-Devpi-Auth"] = auth
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=30) as answer:
        return json.load(answer)


def main(base: str, password_file: str, pairs: list[str]) -> int:
    deadline = time.monotonic() + 60
    while True:
        try:
            call("GET", f"{base}/+api")
            break
        except (OSError, urllib.error.URLError) as error:
            if time.monotonic() > deadline:
                print(f"devpi-server at {base} did not answer within 60 s: {error}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    password = open(password_file).read().strip()
    token = call("POST", f"{base}/+login", {"user": "root", "password": password})["result"]["password"]
    auth = base64.b64encode(f"root:{token}".encode()).decode()
    for pair in pairs:
        index, url = pair.split("=", 1)
        try:
            call("GET", f"{base}/{index}")
            call("PATCH", f"{base}/{index}", [f"mirror_url={url}"], auth)
            print(f"updated {index}: mirror of {url}")
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
            call("PUT", f"{base}/{index}", {"type": "mirror", "mirror_url": url}, auth)
            print(f"created {index}: mirror of {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
