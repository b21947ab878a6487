"""Wheels in one xz archive and back, for the offline GPU check (scripts/gpu_prepare.sh, gpu_check.sh).

A wheel is a zip whose members are already deflated, so an archive of wheels compresses no
further; binary wheels (scipy, av) are a third smaller as their unpacked files under xz. So:

    python gpu_pack.py pack   WHEEL_DIR  OUT.tar.xz   # each WHEEL's files under WHEEL/ (its name)
    python gpu_pack.py unpack IN.tar.xz  WHEEL_DIR    # the same wheels rebuilt, then verified
    python gpu_pack.py verify WHEEL_DIR               # every file against its RECORD sha256

A rebuilt wheel holds the same files (paths and bytes) as the original; only the zip container
differs. `verify` checks every file of every wheel against the hashes of its own
`*.dist-info/RECORD`, so a wheel that did not survive the round trip is refused before pip sees it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
import tarfile
import zipfile
from pathlib import Path


def pack(wheel_dir: Path, out: Path) -> None:
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {wheel_dir}")
    with tarfile.open(out, "w:xz", preset=6) as tar:
        for whl in wheels:
            with zipfile.ZipFile(whl) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    data = zf.read(info)
                    member = tarfile.TarInfo(f"{whl.name}/{info.filename}")
                    member.size = len(data)
                    member.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                    tar.addfile(member, io.BytesIO(data))


def unpack(archive: Path, wheel_dir: Path) -> None:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    open_zips: dict[str, zipfile.ZipFile] = {}
    try:
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name, _, inner = member.name.partition("/")
                if not name.endswith(".whl") or not inner or ".." in Path(inner).parts:
                    raise SystemExit(f"unexpected member {member.name!r} in {archive.name}")
                zf = open_zips.get(name)
                if zf is None:
                    zf = open_zips[name] = zipfile.ZipFile(wheel_dir / name, "w",
                                                           zipfile.ZIP_DEFLATED)
                info = zipfile.ZipInfo(inner, date_time=(2020, 1, 1, 0, 0, 0))
                info.external_attr = (member.mode & 0o777 | 0o100000) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, tar.extractfile(member).read())
    finally:
        for zf in open_zips.values():
            zf.close()


def verify(wheel_dir: Path) -> int:
    """Check every wheel's files against its RECORD; returns the number of wheels checked."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            names = set(zf.namelist())
            record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
            if record is None:
                raise SystemExit(f"{whl.name}: no RECORD")
            for row in csv.reader(io.StringIO(zf.read(record).decode())):
                if not row or not row[1]:
                    continue  # RECORD itself (and signatures) carry no hash
                path, digest = row[0], row[1]
                algo, _, want = digest.partition("=")
                if path not in names:
                    raise SystemExit(f"{whl.name}: {path} missing")
                got = base64.urlsafe_b64encode(hashlib.new(algo, zf.read(path)).digest())
                if got.rstrip(b"=").decode() != want:
                    raise SystemExit(f"{whl.name}: {path} does not match its RECORD hash")
    return len(wheels)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "pack":
        pack(Path(argv[1]), Path(argv[2]))
    elif len(argv) == 3 and argv[0] == "unpack":
        unpack(Path(argv[1]), Path(argv[2]))
        print(f"{verify(Path(argv[2]))} wheels rebuilt and verified against their RECORD")
    elif len(argv) == 2 and argv[0] == "verify":
        print(f"{verify(Path(argv[1]))} wheels verified against their RECORD")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
