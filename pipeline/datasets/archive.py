"""Extract known members of a tar archive, and nothing else.

Downloaded archives are untrusted: a member with an absolute path, a `..` component, a link or a
device is refused (the whole archive is rejected), only the expected regular files are written, each
capped at its known size, and the members are written flat into one folder under their base names.
"""

import logging
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from pipeline.datasets.download import file_digest
from pipeline.errors import UserError

log = logging.getLogger(__name__)


def extract_members(
    archive: Path, max_sizes: dict[str, int], out: Path, member_md5: dict[str, str], md5_key: str
) -> None:
    """Write the members named in `max_sizes` (archive path -> largest allowed size) into `out`.

    `member_md5` maps base names to expected MD5s (named `md5_key` in messages).
    """
    found = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _refuse_unsafe(archive, member)
                if member.name not in max_sizes:
                    continue
                if not member.isfile():
                    raise UserError(f"{archive}: member {member.name} is not a regular file")
                if member.size > max_sizes[member.name]:
                    raise UserError(
                        f"{archive}: member {member.name} is {member.size} bytes, "
                        f"more than the {max_sizes[member.name]} it may have"
                    )
                _copy(archive, tar, member, out / PurePosixPath(member.name).name)
                found.add(member.name)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(f"{archive}: corrupt or truncated archive ({e})") from None
    if missing := sorted(set(max_sizes) - found):
        raise UserError(f"{archive}: expected members missing: {', '.join(missing)}")
    for name, md5 in member_md5.items():
        if not (out / name).exists():
            raise UserError(f"{md5_key} names {name}, which the archive does not provide")
        if (got := file_digest(out / name)) != md5:
            raise UserError(f"{archive}: member {name} has MD5 {got}, but {md5_key}.{name} is {md5}")


def _refuse_unsafe(archive: Path, member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise UserError(f"{archive}: refusing member with unsafe path {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{archive}: refusing member {member.name!r}: links and devices are not allowed")


def _copy(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    source = tar.extractfile(member)
    assert source is not None, f"{member.name} is a regular file"
    with source, open(dest, "wb") as f:
        remaining = member.size
        while remaining and (chunk := source.read(min(remaining, 1 << 20))):
            f.write(chunk)
            remaining -= len(chunk)
    if remaining:
        raise UserError(f"{archive}: member {member.name} is truncated")
