"""The offline GPU folder's wheel handling (scripts/gpu_pack.py), on small wheels made here: a trimmed
package keeps exactly the modules named in the keep file plus its data, shared libraries and
dist-info, its RECORD lists what is kept with the published hashes, the rebuilt wheels pass `verify`,
and a changed byte does not. The folder itself (size, the GPU tests against it) is built and tried
by scripts/gpu_prepare.sh."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_pack  # noqa: E402

FILES = {
    "pkg/__init__.py": b"from . import used\n",
    "pkg/used.py": b"X = 1\n",
    "pkg/unused.py": b"Y = 2\n",
    "pkg/_ext.cpython-312-x86_64-linux-gnu.so": b"\x7fELF used",
    "pkg/_other.cpython-312-x86_64-linux-gnu.so": b"\x7fELF unused",
    "pkg/_stub.pyi": b"X: int\n",
    "pkg/data.npz": b"data",
    "pkg/libhelper.so": b"\x7fELF helper",
    "pkg/tests/__init__.py": b"",
    "pkg/tests/test_used.py": b"def test(): pass\n",
    "pkg/tests/data.txt": b"fixture",
    "pkg.libs/libblas-1234.so": b"\x7fELF blas",
    "other/__init__.py": b"Z = 3\n",
}
KEEP = ["pkg/__init__.py", "pkg/used.py", "pkg/_ext.so"]
KEPT = {"pkg/__init__.py", "pkg/used.py", "pkg/_ext.cpython-312-x86_64-linux-gnu.so",
        "pkg/data.npz", "pkg/libhelper.so", "pkg.libs/libblas-1234.so", "other/__init__.py"}


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    dist = name.split("-")[0] + "-1.0.dist-info"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path, data in files.items():
        writer.writerow([path, _digest(data), len(data)])
    writer.writerow([f"{dist}/RECORD", "", ""])
    path = folder / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist}/RECORD", record.getvalue())
    return path


@pytest.fixture()
def packed(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "pkg-1.0-cp312-cp312-manylinux_2_28_x86_64.whl", FILES)
    _wheel(wheels, "plain-1.0-py3-none-any.whl", {"plain/__init__.py": b"P = 1\n",
                                                  "plain/tests/t.py": b""})
    keep = tmp_path / "trimmed.txt"
    keep.write_text("\n".join(KEEP) + "\n")
    archive = tmp_path / "wheels.tar.xz"
    gpu_pack.pack(wheels, archive, gpu_pack.read_keep(keep))
    out = tmp_path / "rebuilt"
    gpu_pack.unpack(archive, out)
    return out


def test_trim_keeps_the_named_modules_and_everything_that_is_not_a_module(packed):
    with zipfile.ZipFile(packed / "pkg-1.0-cp312-cp312-manylinux_2_28_x86_64.whl") as zf:
        names = set(zf.namelist())
        assert names - {"pkg-1.0.dist-info/RECORD"} == KEPT
        for path in KEPT:
            assert zf.read(path) == FILES[path]
        rows = list(csv.reader(io.StringIO(zf.read("pkg-1.0.dist-info/RECORD").decode())))
    assert {r[0] for r in rows} == KEPT | {"pkg-1.0.dist-info/RECORD"}
    assert all(r[1] == _digest(FILES[r[0]]) for r in rows if r[1])
    # a package not named in the keep file is carried whole, its tests too
    with zipfile.ZipFile(packed / "plain-1.0-py3-none-any.whl") as zf:
        assert set(zf.namelist()) >= {"plain/__init__.py", "plain/tests/t.py"}
    assert gpu_pack.verify(packed) == 2


def test_verify_refuses_a_changed_byte(packed):
    whl = packed / "pkg-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(whl) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["pkg/used.py"] = b"X = 2\n"
    with zipfile.ZipFile(whl, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(SystemExit, match="pkg/used.py does not match its RECORD hash"):
        gpu_pack.verify(packed)


def test_keep_rule_matches_extension_modules_of_any_python(tmp_path):
    keep = {"pkg": {"pkg/_ext.so", "pkg/sub/__init__.py"}}
    assert gpu_pack.kept("pkg/_ext.cpython-311-x86_64-linux-gnu.so", keep)
    assert gpu_pack.kept("pkg/_ext.abi3.so", keep)
    assert not gpu_pack.kept("pkg/_other.cpython-311-x86_64-linux-gnu.so", keep)
    assert not gpu_pack.kept("pkg/sub/tests/data.bin", keep)  # tests go, data or not
    assert gpu_pack.kept("pkg/sub/table.dat", keep)
    assert gpu_pack.kept("pkg-1.0.dist-info/METADATA", keep)
