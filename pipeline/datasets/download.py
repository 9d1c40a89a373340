"""HTTP download with retries, resume of partial files and a checksum gate."""

import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import UserError
from pipeline.progress import progress

log = logging.getLogger(__name__)


def file_digest(path: Path, algorithm: str = "md5") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def download(url: str, dest: Path, md5: str, *, retries: int, timeout_s: float, md5_key: str) -> Path:
    """Fetch `url` to `dest` unless `dest` already has the right MD5.

    Bytes arrive in `dest.part`, which survives failures and interruptions: the next attempt (or the
    next run) asks the server for the rest with an HTTP Range request. `dest` appears only once the
    whole file has arrived and matches `md5` (named in messages as the params key `md5_key`).
    """
    if dest.exists():
        if (found := file_digest(dest)) == md5:
            log.info("%s: already downloaded, MD5 verified", dest)
            return dest
        log.warning("%s has MD5 %s, not %s (%s): downloading it again", dest, found, md5, md5_key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offline = f"to work offline, put the archive (MD5 {md5}) at {dest}"
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout_s)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416:  # the partial file is not a prefix of what the server has: start over
                part.unlink(missing_ok=True)
            elif e.code < 500:
                raise UserError(f"download of {url} failed: HTTP {e.code} {e.reason}; {offline}") from None
            error: Exception = e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
        if attempt == retries:
            raise UserError(
                f"download of {url} failed after {retries + 1} attempt(s): {error}; {_kept(part)}; {offline}"
            )
        log.warning("download of %s interrupted (%s); retrying (%d/%d)", url, error, attempt + 1, retries)
        time.sleep(min(2.0**attempt, 30.0))
    found = file_digest(part)
    if found != md5:
        part.unlink()
        raise UserError(
            f"{url}: downloaded file has MD5 {found} but {md5_key} is {md5}; the file is "
            "corrupt, truncated or a different version. It was deleted; check the URL and checksum"
        )
    part.rename(dest)
    return dest


def _kept(part: Path) -> str:
    """What a failed download leaves: the bytes received (resumed next time), or nothing."""
    if part.exists() and part.stat().st_size:
        return f"the {part.stat().st_size} bytes received are kept in {part} and the next run resumes from there"
    part.unlink(missing_ok=True)
    return "nothing was received"


def _fetch(url: str, part: Path, timeout_s: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        if have and response.status != 206:  # the server ignored Range: take the whole file again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, progress(f"download {part.name}", total, "bytes") as advance:
            advance(have)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                advance(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)
