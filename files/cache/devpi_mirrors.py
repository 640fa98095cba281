"""Create or update devpi-server's indexes:
devpi_mirrors.py BASE PASSWORD_FILE [--private INDEX USER USER_PASSWORD_FILE] INDEX=URL ...

Run on the cache host by deploys/cache.py with devpi's own Python; waits up to 60 s for the server to answer,
logs in as root (password from PASSWORD_FILE) and sets each index's mirror_url (PUT if new, PATCH if not).
With --private: the user USER with the password in USER_PASSWORD_FILE (created, or its password set), and INDEX a
private index that inherits nothing, keeps every upload and takes uploads from USER alone (the built wheels).
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
    if pairs[:1] == ["--private"]:
        index, user, user_password_file = pairs[1:4]
        pairs = pairs[4:]
        private_index(base, auth, index, user, open(user_password_file).read().strip())
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


def private_index(base: str, auth: str, index: str, user: str, password: str) -> None:
    try:
        call("GET", f"{base}/{user}")
        call("PATCH", f"{base}/{user}", {"password": password}, auth)
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
        call("PUT", f"{base}/{user}", {"password": password}, auth)
        print(f"created the devpi user {user}")
    settings = {"type": "stage", "bases": [], "volatile": False, "acl_upload": [user]}
    try:
        call("GET", f"{base}/{index}")
        call("PATCH", f"{base}/{index}", [f"{k}={v}" for k, v in (("bases", ""), ("volatile", "False"),
                                                                 ("acl_upload", user))], auth)
        print(f"updated {index}: private, uploads by {user}")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
        call("PUT", f"{base}/{index}", settings, auth)
        print(f"created {index}: private, uploads by {user}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
