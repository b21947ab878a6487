"""Wheels in one xz archive and back, for the offline GPU check (scripts/gpu_prepare.sh, gpu_check.sh).

A wheel is a zip whose members are already deflated, so an archive of wheels compresses no
further; binary wheels (scipy, av) are a third smaller as their unpacked files under xz. So:

    python gpu_pack.py pack   WHEEL_DIR OUT.tar.xz [--trim KEEP_FILE]  # each WHEEL's files under WHEEL/
    python gpu_pack.py unpack IN.tar.xz WHEEL_DIR    # the same wheels rebuilt, then verified
    python gpu_pack.py verify WHEEL_DIR              # every file against its RECORD sha256
    python gpu_pack.py imports KEEP_FILE             # import every module KEEP_FILE names
    python gpu_pack.py shadow KEEP_FILE OUT_DIR      # this Python's packages as the folder has them

A rebuilt wheel holds the same files (paths and bytes) as the original; only the zip container
differs. `verify` checks every file of every wheel against the hashes of its own
`*.dist-info/RECORD`, so a wheel that did not survive the round trip is refused before pip sees it.

`--trim KEEP_FILE` (written by gpu_wheels.py --loaded: the modules a real boot of each host loads,
e.g. `scipy/stats/_stats_py.py`, `scipy/special/_ufuncs.so`) carries a package only in part: inside
each top-level package named in KEEP_FILE, its `tests/` folders and the modules (.py, .pyi, .pyx,
.pxd, .pxi, extension modules) not named there are left out; data files, bundled shared libraries
and the dist-info stay. The wheel's RECORD is rewritten to list what is kept (with the original
hashes), so `verify` holds the kept files to the published bytes. This is what brings scipy from
108 MiB to 82 MiB unpacked (16 MiB packed), and the folder under its 50 MiB budget.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import lzma
import re
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

XZ_FILTERS = [{"id": lzma.FILTER_X86},
              {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 64 << 20}]
"""x86 branch filter (the archive is mostly x86-64 machine code), then LZMA2 at its strongest with a
64 MiB window; any xz reader unpacks it (Python's tarfile `r:xz`, `tar xJf`)."""
EXT_TAG = re.compile(r"\.(cpython-\d+[a-z]*-[^.]+|abi3)\.so$")
"""The ABI tag of an extension module's file name (`_ufuncs.cpython-312-x86_64-linux-gnu.so`):
KEEP_FILE names extension modules without it (`_ufuncs.so`), so one list serves every Python."""
MODULE = re.compile(r"\.(py|pyi|pyx|pxd|pxi)$|" + EXT_TAG.pattern)


def read_keep(keep_file: Path) -> dict[str, set[str]]:
    """KEEP_FILE lines grouped by their top-level package: {"scipy": {"scipy/__init__.py", ...}}."""
    keep: dict[str, set[str]] = {}
    for line in keep_file.read_text().split():
        keep.setdefault(line.split("/", 1)[0], set()).add(line)
    return keep


def kept(path: str, keep: dict[str, set[str]]) -> bool:
    """Whether a wheel member stays under `--trim` (see the module docstring)."""
    parts = PurePosixPath(path).parts
    if parts[0] not in keep:
        return True
    if "tests" in parts[1:-1]:
        return False
    return not MODULE.search(path) or EXT_TAG.sub(".so", path) in keep[parts[0]]


def record_without(data: bytes, names: set[str]) -> bytes:
    """A RECORD listing only `names` (and itself), rows otherwise unchanged."""
    rows = [row for row in csv.reader(io.StringIO(data.decode()))
            if row and (row[0] in names or row[0].endswith(".dist-info/RECORD"))]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def pack(wheel_dir: Path, out: Path, keep: dict[str, set[str]] | None = None) -> None:
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {wheel_dir}")
    keep = keep or {}
    with lzma.open(out, "wb", format=lzma.FORMAT_XZ, filters=XZ_FILTERS) as xz, \
            tarfile.open(fileobj=xz, mode="w|") as tar:
        for whl in wheels:
            with zipfile.ZipFile(whl) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
                names = {i.filename for i in infos if kept(i.filename, keep)}
                if len(names) < len(infos):
                    left = [i for i in infos if i.filename not in names]
                    print(f"{whl.name.split('-')[0]}: {len(names)} of {len(infos)} files kept, "
                          f"{len(left)} unused modules and tests left out "
                          f"({sum(i.file_size for i in left) / 2**20:.1f} MiB unpacked)")
                for info in infos:
                    if info.filename not in names:
                        continue
                    data = zf.read(info)
                    if len(names) < len(infos) and info.filename.endswith(".dist-info/RECORD"):
                        data = record_without(data, names)
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


def imports(keep_file: Path) -> str:
    """Import every module of KEEP_FILE (in the installed packages); a line saying how many did."""
    import importlib

    counts = []
    for top, paths in sorted(read_keep(keep_file).items()):
        names = sorted({re.sub(r"\.(py|so)$", "", p).replace("/", ".").removesuffix(".__init__")
                        for p in paths})
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # any failure means the trimmed package is broken
                raise SystemExit(f"{name}: {type(exc).__name__}: {exc}") from None
        counts.append(f"{len(names)} kept {top} modules import")
    return ", ".join(counts)


def shadow(keep_file: Path, out: Path) -> str:
    """OUT_DIR, put first on PYTHONPATH, makes this Python see its packages as the GPU folder
    carries them: each trimmed package copied with `--trim`'s rule (its bundled `<name>.libs`
    linked beside it), and each of gpu_wheels.LEFT_OUT replaced by a package whose import fails.
    How gpu_prepare.sh runs the GPU tests on the CPU against the folder before it is shipped."""
    import importlib.util
    import shutil

    from gpu_wheels import LEFT_OUT

    keep = read_keep(keep_file)
    out.mkdir(parents=True, exist_ok=True)
    counts = []
    for top in sorted(keep):
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin is None:
            raise SystemExit(f"{top} is not installed for {sys.executable}")
        package = Path(spec.origin).resolve().parent
        copied = 0
        for file in sorted(package.rglob("*")):
            rel = f"{top}/{file.relative_to(package).as_posix()}"
            if file.is_file() and "__pycache__" not in file.parts and kept(rel, keep):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out / rel)
                copied += 1
        libs = package.with_name(f"{top}.libs")
        if libs.is_dir():
            (out / libs.name).symlink_to(libs)
        counts.append(f"{top} ({copied} files)")
    for name in LEFT_OUT:
        (out / name).mkdir(exist_ok=True)
        (out / name / "__init__.py").write_text(
            f'raise ImportError("{name} is left out of the GPU folder (gpu_wheels.LEFT_OUT)")\n')
    return f"trimmed: {', '.join(counts)}; left out: {', '.join(LEFT_OUT)}"


def main(argv: list[str]) -> int:
    if len(argv) in (3, 5) and argv[0] == "pack" and argv[3:4] in ([], ["--trim"]):
        pack(Path(argv[1]), Path(argv[2]), read_keep(Path(argv[4])) if len(argv) == 5 else None)
    elif len(argv) == 3 and argv[0] == "unpack":
        unpack(Path(argv[1]), Path(argv[2]))
        print(f"{verify(Path(argv[2]))} wheels rebuilt and verified against their RECORD")
    elif len(argv) == 2 and argv[0] == "imports":
        print(imports(Path(argv[1])))
    elif len(argv) == 3 and argv[0] == "shadow":
        print(shadow(Path(argv[1]), Path(argv[2])))
    elif len(argv) == 2 and argv[0] == "verify":
        print(f"{verify(Path(argv[1]))} wheels verified against their RECORD")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
