"""An uploaded adapter archive is read by file name only (pure, no database)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from service.domain.adapter_import import AdapterRefused, safetensors_header, unpack_tar


def _tar(members: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """(name, data, link target) -> a tar; data None with a target is a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, target in members:
            info = tarfile.TarInfo(name)
            if target is not None:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def test_only_the_adapter_files_are_written_by_their_base_name(tmp_path: Path):
    data = _tar([("../../escape/adapter_config.json", b"{}", None),
                 ("x/adapter_model.safetensors", None, "/etc/passwd"),
                 ("x/training_args.bin", b"\x80\x04pickle", None),
                 ("x/notes.txt", b"hello", None)])
    names = unpack_tar(data, tmp_path / "out")
    assert len(names) == 4
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    # The config by its name inside out/; the symlink not followed; the pickle's name only.
    assert written == ["adapter_config.json", "training_args.bin"]
    assert (tmp_path / "out" / "training_args.bin").read_bytes() == b""
    assert not (tmp_path / "escape").exists()


def test_a_body_that_is_not_a_tar_is_refused(tmp_path: Path):
    with pytest.raises(AdapterRefused) as exc:
        unpack_tar(b"definitely not a tar archive" * 40, tmp_path)
    assert exc.value.code == "bad_archive"


def test_safetensors_header_is_read_without_torch(tmp_path: Path):
    bad = tmp_path / "a.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(AdapterRefused, match="header size"):
        safetensors_header(bad)
    good = tmp_path / "b.safetensors"
    header = b'{"x.lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}'
    good.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 32)
    assert safetensors_header(good) == {"x.lora_A.weight": {"dtype": "F32", "shape": [2, 4],
                                                            "data_offsets": [0, 32]}}
