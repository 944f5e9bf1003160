"""WooCommerce REST authentication, as ``WC_REST_Authentication`` does it.

* Over HTTPS: consumer key/secret from the query string first, else HTTP Basic.
* Over plain HTTP: one-legged OAuth 1.0a only (HMAC-SHA1 or HMAC-SHA256, key = secret + "&",
  15-minute timestamp window, nonces never reused). Basic over HTTP is ignored, as on a real store:
  the request goes on anonymously and the endpoint's permission check answers 401.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import parse_qsl, quote, unquote

from .domain import StoreError
from .storage import Store

WWW_AUTH = ('Basic realm="WooCommerce API. Use a consumer key in the username field and a consumer '
            'secret in the password field."')
OAUTH_PARAMS = ("oauth_consumer_key", "oauth_timestamp", "oauth_nonce", "oauth_signature", "oauth_signature_method")


def rfc3986(value: str) -> str:
    return quote(value, safe="~-._")


def oauth_base_string(method: str, url: str, params: dict[str, str]) -> str:
    """The string WooCommerce signs: METHOD&enc(url)&enc(k=v&... sorted by key)."""
    pairs = sorted((k, v) for k, v in params.items() if k != "oauth_signature")
    # normalize_parameters() encodes keys and values, join_with_equals_sign() encodes "k=v" again.
    query = "%26".join(rfc3986(f"{rfc3986(k)}={rfc3986(v)}") for k, v in pairs)
    return f"{method.upper()}&{rfc3986(url)}&{query}"


def oauth_signature(method: str, url: str, params: dict[str, str], secret: str, algo: str = "HMAC-SHA256") -> str:
    digest = {"HMAC-SHA1": hashlib.sha1, "HMAC-SHA256": hashlib.sha256}[algo]
    mac = hmac.new(f"{secret}&".encode(), oauth_base_string(method, url, params).encode(), digest)
    return base64.b64encode(mac.digest()).decode()


def _parse_oauth_header(header: str) -> dict[str, str]:
    if not header.lower().startswith("oauth "):
        return {}
    out = {}
    for part in header[6:].split(","):
        if "=" in part:
            k, v = part.strip().split("=", 1)
            out[k] = unquote(v.strip().strip('"'))
    return out


def authenticate(store: Store, *, scheme: str, method: str, url: str, query: str, headers: dict[str, str],
                 form: str = "") -> dict | None:
    """Return the API key row, None for an anonymous request, or raise StoreError (401)."""
    if scheme == "https":
        params = dict(parse_qsl(query, keep_blank_values=True))
        if params.get("consumer_key") and params.get("consumer_secret"):
            key, secret = params["consumer_key"], params["consumer_secret"]
        elif headers.get("authorization", "").lower().startswith("basic "):
            try:
                key, _, secret = base64.b64decode(headers["authorization"][6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
        else:
            return None
        row = store.db.execute("SELECT * FROM api_keys WHERE consumer_key=?", (key,)).fetchone()
        if row is None:
            return None  # unknown key: no error here, the permission check will refuse
        if not hmac.compare_digest(row["consumer_secret"], secret):
            raise StoreError("woocommerce_rest_authentication_error", "Consumer secret is invalid.", 401,
                             www_authenticate=WWW_AUTH)
        return dict(row)

    params = dict(parse_qsl(query, keep_blank_values=True))
    params.update(dict(parse_qsl(form, keep_blank_values=True)))
    params.update(_parse_oauth_header(headers.get("authorization", "")))
    present = [p for p in OAUTH_PARAMS if params.get(p)]
    if not present:
        return None
    missing = [p for p in OAUTH_PARAMS if not params.get(p)]
    if missing:
        noun = "parameter" if len(missing) == 1 else "parameters"
        raise StoreError("woocommerce_rest_authentication_missing_parameter",
                         f"Missing OAuth {noun} {', '.join(missing)}", 401)
    row = store.db.execute("SELECT * FROM api_keys WHERE consumer_key=?", (params["oauth_consumer_key"],)).fetchone()
    if row is None:
        raise StoreError("woocommerce_rest_authentication_error", "Consumer key is invalid.", 401)
    algo = params["oauth_signature_method"]
    if algo not in ("HMAC-SHA1", "HMAC-SHA256"):
        raise StoreError("woocommerce_rest_authentication_error",
                         "Invalid signature - signature method is invalid.", 401)
    expected = oauth_signature(method, url, params, row["consumer_secret"], algo)
    given = params["oauth_signature"].replace(" ", "+")
    if not hmac.compare_digest(expected, given):
        raise StoreError("woocommerce_rest_authentication_error",
                         "Invalid signature - provided signature does not match.", 401)
    try:
        ts = int(params["oauth_timestamp"])
    except ValueError:
        ts = 0
    now = int(time.time())
    if abs(now - ts) > 15 * 60:
        raise StoreError("woocommerce_rest_authentication_error", "Invalid timestamp.", 401)
    with store.write_lock:
        store.db.execute("DELETE FROM oauth_nonces WHERE ts < ?", (now - 15 * 60,))
        try:
            store.db.execute("INSERT INTO oauth_nonces VALUES (?,?,?)", (row["consumer_key"], params["oauth_nonce"], ts))
        except Exception as exc:  # sqlite3.IntegrityError: the nonce was seen before
            raise StoreError("woocommerce_rest_authentication_error",
                             "Invalid nonce - nonce has already been used.", 401) from exc
    return dict(row)
