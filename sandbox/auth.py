"""WooCommerce REST authentication, as ``WC_REST_Authentication`` does it
(plugins/woocommerce/includes/class-wc-rest-authentication.php).

* Over HTTPS: consumer key/secret from the query string first, else HTTP Basic. When that does not
  log a user in (no keys, unknown key, wrong secret), OAuth 1.0a is tried next, as on plain HTTP:
  ``authenticate()`` calls ``perform_oauth_authentication()`` whenever Basic returned no user. A
  wrong secret leaves its error set; because OAuth then ran, ``auth_method`` is ``oauth1`` and
  ``send_unauthorized_headers`` sends no ``WWW-Authenticate``.
* OAuth 1.0a one-legged (HMAC-SHA1 or HMAC-SHA256, key = secret + "&", 15-minute timestamp window,
  nonces never reused): parameters from the query string, the form body and the ``Authorization:
  OAuth`` header (only its ``oauth_*`` pairs, so ``realm`` is never signed); top-level keys sorted
  with ``strcmp``; array parameters signed by index (``key[0]``); the given signature rawurldecoded.
* Basic over plain HTTP is ignored: the request goes on anonymously and the endpoint's permission
  check answers 401.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from urllib.parse import parse_qsl, quote, unquote

from .domain import StoreError
from .storage import Store

WWW_AUTH = ('Basic realm="WooCommerce API. Use a consumer key in the username field and a consumer '
            'secret in the password field."')
OAUTH_PARAMS = ("oauth_consumer_key", "oauth_timestamp", "oauth_nonce", "oauth_signature", "oauth_signature_method")


def rfc3986(value: str) -> str:
    """``wc_rest_urlencode_rfc3986``: PHP ``rawurlencode``."""
    return quote(value, safe="~-._")


def php_params(pairs: list[tuple[str, str]]) -> dict[str, str | dict[str, str]]:
    """PHP's ``$_GET``/``$_POST``: the last value of a key wins, ``k[]=``/``k[i]=`` build an array."""
    out: dict[str, str | dict[str, str]] = {}
    for key, value in pairs:
        m = re.fullmatch(r"([^\[\]]+)\[([^\]]*)\]", key)
        if not m:
            out[key] = value
            continue
        arr = out.get(m[1])
        if not isinstance(arr, dict):
            arr = out[m[1]] = {}
        index = m[2] if m[2] != "" else str(sum(1 for k in arr if k.isdigit()))
        arr[index] = value
    return out


def _join_with_equals_sign(params: dict, prefix: str = "") -> list[str]:
    """``join_with_equals_sign``: an array value is signed as ``key%5B0%5D=value`` (then encoded again)."""
    out = []
    for key, value in params.items():
        if prefix:
            key = f"{prefix}%5B{key}%5D"
        if isinstance(value, dict):
            out.extend(_join_with_equals_sign(value, key))
        else:
            out.append(rfc3986(f"{key}={value}"))
    return out


def _normalize(value):
    if isinstance(value, dict):
        return {rfc3986(str(k)): _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return {rfc3986(str(n)): _normalize(v) for n, v in enumerate(value)}
    return rfc3986(str(value))


def oauth_base_string(method: str, url: str, params: dict) -> str:
    """The string WooCommerce signs: METHOD&enc(url)&enc(k=v)%26... (``check_oauth_signature``)."""
    ordered = sorted(((k, v) for k, v in params.items() if k != "oauth_signature"), key=lambda kv: kv[0].encode())
    normalized = {rfc3986(k): _normalize(v) for k, v in ordered}
    return f"{method.upper()}&{rfc3986(url)}&{'%26'.join(_join_with_equals_sign(normalized))}"


def oauth_signature(method: str, url: str, params: dict, secret: str, algo: str = "HMAC-SHA256") -> str:
    digest = {"HMAC-SHA1": hashlib.sha1, "HMAC-SHA256": hashlib.sha256}[algo]
    mac = hmac.new(f"{secret}&".encode(), oauth_base_string(method, url, params).encode(), digest)
    return base64.b64encode(mac.digest()).decode()


def _parse_oauth_header(header: str) -> dict[str, str]:
    """``parse_header``: only ``oauth_*`` pairs are taken, so ``realm`` never reaches the signature."""
    if not header.startswith("OAuth "):
        return {}
    return {m[1]: unquote(m[3] if m[3] else m[4])
            for m in re.finditer(r'(oauth_[a-z_-]*)=(:?"([^"]*)"|([^,]*))', header)}


def _basic(store: Store, params: dict, headers: dict[str, str]):
    """``perform_basic_authentication``: (key row or None, error or None)."""
    key = secret = ""
    if params.get("consumer_key") and params.get("consumer_secret"):
        key, secret = params["consumer_key"], params["consumer_secret"]
    if not key and headers.get("authorization", "").lower().startswith("basic "):
        try:
            key, _, secret = base64.b64decode(headers["authorization"][6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            key = secret = ""
    if not key or not secret or not isinstance(key, str) or not isinstance(secret, str):
        return None, None
    row = store.db.execute("SELECT * FROM api_keys WHERE consumer_key=?", (key,)).fetchone()
    if row is None:
        return None, None  # unknown key: no error here, the permission check will refuse
    if not hmac.compare_digest(row["consumer_secret"], secret):
        return None, StoreError("woocommerce_rest_authentication_error", "Consumer secret is invalid.", 401)
    return dict(row), None


def _oauth(store: Store, method: str, url: str, params: dict) -> dict | None:
    """``perform_oauth_authentication``: the key row, None when no OAuth was attempted, or raise."""
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
    given = unquote(str(params["oauth_signature"]).replace(" ", "+"))
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


def authenticate(store: Store, *, scheme: str, method: str, url: str, query: str, headers: dict[str, str],
                 form: str = "") -> dict | None:
    """Return the API key row, None for an anonymous request, or raise StoreError (401)."""
    get = php_params(parse_qsl(query, keep_blank_values=True))
    error = None
    if scheme == "https":  # is_ssl()
        row, error = _basic(store, get, headers)
        if row is not None:
            return row
    params = {**get, **php_params(parse_qsl(form, keep_blank_values=True)),
              **_parse_oauth_header(headers.get("authorization", "").strip())}
    row = _oauth(store, method, url, params)  # its own error replaces Basic's (set_error)
    if error is not None:
        raise error  # Basic's error stays set even when OAuth then logs a user in
    return row


def check_permissions(key: dict, method: str) -> None:
    """``check_permissions``: a key's scope against the request method (401, not 403)."""
    perms = key["permissions"]
    if method in ("GET", "HEAD") and perms not in ("read", "read_write"):
        raise StoreError("woocommerce_rest_authentication_error",
                         "The API key provided does not have read permissions.", 401)
    if method in ("POST", "PUT", "PATCH", "DELETE") and perms not in ("write", "read_write"):
        raise StoreError("woocommerce_rest_authentication_error",
                         "The API key provided does not have write permissions.", 401)
