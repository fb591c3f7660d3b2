"""A reasoning item's `encrypted_content`: the reasoning text in a blob the server can read back in
a later stateless turn (`store: false`, as Codex runs), and that a client cannot forge.

The blob is authenticated (HMAC-SHA256 under a key only the server holds), not encrypted: the text
it holds is the one the same item already shows the client in its `content`, so there is nothing
to hide, only text to keep from being injected through it, which the tag does. The key lives in a
file of its own (created once, readable by its owner only), so blobs stay readable across restarts
and by every server that shares the file.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from server.api.errors import invalid_request

_VERSION = b"ns1"
_TAG_BYTES = 32
KEY_BYTES = 32


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, written there first (0600, atomically) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_bytes(KEY_BYTES))
        try:
            os.link(staging, path)  # never replaces a key another server wrote meanwhile
        except FileExistsError:
            pass
        finally:
            staging.unlink()
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise RuntimeError(f"the reasoning key file {path} holds {len(key)} bytes, not {KEY_BYTES}")
    return key


class ReasoningSeal:
    def __init__(self, key: bytes):
        self._key = key

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _VERSION + payload, hashlib.sha256).digest()

    def seal(self, reasoning: str) -> str:
        payload = json.dumps({"reasoning": reasoning}, ensure_ascii=False).encode()
        return base64.urlsafe_b64encode(_VERSION + self._tag(payload) + payload).decode()

    def open(self, blob: str, param: str) -> str:
        """The reasoning a blob of this server holds; a 400 naming `param` for any other blob."""
        try:
            raw = base64.urlsafe_b64decode(blob.encode())
        except ValueError:
            raw = b""
        tag, payload = raw[len(_VERSION):len(_VERSION) + _TAG_BYTES], raw[len(_VERSION) + _TAG_BYTES:]
        if not raw.startswith(_VERSION) or not hmac.compare_digest(tag, self._tag(payload)):
            raise invalid_request(f"The encrypted content of '{param}' could not be verified: it was not made by this "
                                  "server, or was changed.", param=param, code="invalid_encrypted_content")
        return json.loads(payload)["reasoning"]
