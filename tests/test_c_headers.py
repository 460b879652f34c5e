"""The C headers a C program would include agree with the construct declarations.

csrc/vpv_control.h mirrors the control messages (vhost_pv/control/wire.py) and
csrc/vpv_ring.h the quarantine ring on disk (vhost_pv/volume/ring.py). A small C program is
compiled against both and prints every struct size, field offset and command number.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from construct import Struct

from vhost_pv.control import wire
from vhost_pv.volume import ring

CSRC = Path(__file__).resolve().parents[1] / "csrc"

# C struct name -> (construct layout, C field names in order, with None for padding).
LAYOUTS: dict[str, tuple[Any, list[str | None]]] = {
    "vpv_ctl_header": (wire.ControlHeader, ["magic", "version", "flags", "cmd", "seq", "length"]),
    "vpv_ctl_dangling": (wire.DanglingRequest, ["volume", "flags", "pad", "reason"]),
    "vpv_ctl_dangling_reply": (
        wire.DanglingReply, ["state", "changed", "generation", "dangling_since_ns", "flip_ns"]
    ),
    "vpv_ctl_reclaim": (wire.ReclaimRequest, ["volume", "owner", "mode", "pad"]),
    "vpv_ctl_ring": (wire.RingRequest, ["volume", "op", "pad"]),
    "vpv_ctl_volume": (wire.VolumeRequest, ["volume", "flags", "pad"]),
    "vpv_ctl_alerts": (wire.AlertsRequest, ["flags", "pad", "since_seq"]),
    "vpv_ctl_bind": (wire.BindRequest, ["volume", "container", "pid", "pad"]),
    "vpv_ctl_meta": (wire.MetaRequest, ["op", "value_len", "vm", "key"]),
    "vpv_ring_super": (
        ring.RingSuper,
        ["magic", "version", "align", "area_offset", "area_size", "head", "tail", "next_seq",
         "records", "dropped", "rejected", "last_hash", "crc32", "pad"],
    ),
    "vpv_ring_record": (
        ring.RecordHeader,
        ["magic", "type", "queue", "seq", "time_ns", "sector", "length", "payload_len", "source",
         "total_len", "payload_sha256", "prev_hash", "record_hash"],
    ),
}

COMMANDS = {
    "VPV_IOC_STATUS": wire.Command.STATUS,
    "VPV_IOC_PERSISTENT_DISK_DANGLING": wire.Command.PERSISTENT_DISK_DANGLING,
    "VPV_IOC_RECLAIM": wire.Command.RECLAIM,
    "VPV_IOC_RING": wire.Command.RING,
    "VPV_IOC_DELETE": wire.Command.DELETE,
    "VPV_IOC_ALERTS": wire.Command.ALERTS,
    "VPV_IOC_BIND": wire.Command.BIND,
    "VPV_IOC_META": wire.Command.META,
}

CONSTANTS = {
    "VPV_RING_SUPER_SIZE": ring.SUPER_SIZE,
    "VPV_RING_ALIGN": ring.ALIGN,
    "VPV_RECORD_HEADER_SIZE": ring.RECORD_HEADER_SIZE,
    "VPV_RECORD_MAGIC": ring.RECORD_MAGIC,
    "VPV_RECORD_WRITE": ring.RecordType.WRITE,
    "VPV_RECORD_DISCARD": ring.RecordType.DISCARD,
    "VPV_RECORD_WRITE_ZEROES": ring.RecordType.WRITE_ZEROES,
    "VPV_RECORD_PAD": ring.RecordType.PAD,
    "VPV_RING_VERSION": ring.RING_VERSION,
    "VPV_CTL_VERSION": wire.CONTROL_VERSION,
    "VPV_CTL_DANGLING_CLEAR": wire.DANGLING_CLEAR,
    "VPV_CTL_DELETE_FORCE": wire.DELETE_FORCE,
    "VPV_CTL_ALERTS_FOLLOW": wire.ALERTS_FOLLOW,
    "VPV_RECLAIM_REPLAY": wire.ReclaimMode.REPLAY,
    "VPV_RECLAIM_DISCARD": wire.ReclaimMode.DISCARD,
    "VPV_RING_DISCARD": wire.RingOp.DISCARD,
    "VPV_META_SET": wire.MetaOp.SET,
    "VPV_META_BOOT": wire.MetaOp.BOOT,
}


def construct_offsets(layout: Struct) -> list[tuple[int, int]]:
    """(offset, size) of every subconstruct, padding included, in order."""
    out = []
    offset = 0
    for sub in layout.subcons:
        size = sub.sizeof()
        out.append((offset, size))
        offset += size
    return out


def c_program() -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        '#include "vpv_control.h"',
        '#include "vpv_ring.h"',
        "int main(void) {",
    ]
    for struct, (_, fields) in LAYOUTS.items():
        lines.append(f'    printf("size {struct} %zu\\n", sizeof(struct {struct}));')
        for field in fields:
            if field is not None:
                lines.append(
                    f'    printf("field {struct}.{field} %zu %zu\\n", '
                    f"offsetof(struct {struct}, {field}), sizeof(((struct {struct} *)0)->{field}));"
                )
    for name in (*COMMANDS, *CONSTANTS):
        lines.append(f'    printf("const {name} %llu\\n", (unsigned long long)({name}));')
    lines.append('    printf("magic %s %s\\n", VPV_RING_MAGIC, VPV_CTL_MAGIC);')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("cheaders")
    source = workdir / "facts.c"
    source.write_text(c_program())
    binary = workdir / "facts"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-I", str(CSRC), "-o", str(binary), str(source)], check=True
    )
    facts: dict[str, Any] = {}
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    for line in output.splitlines():
        kind, rest = line.split(" ", 1)
        if kind == "size":
            name, value = rest.split()
            facts[f"size:{name}"] = int(value)
        elif kind == "field":
            name, offset, size = rest.split()
            facts[f"field:{name}"] = (int(offset), int(size))
        elif kind == "const":
            name, value = rest.split()
            facts[f"const:{name}"] = int(value)
        else:
            facts["magic"] = rest.split()
    return facts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("struct", sorted(LAYOUTS))
def test_struct_layout_matches(c_facts: dict[str, Any], struct: str) -> None:
    layout, fields = LAYOUTS[struct]
    assert c_facts[f"size:{struct}"] == layout.sizeof()
    python = construct_offsets(layout)
    assert len(python) == len(fields)
    for (offset, size), sub, field in zip(python, layout.subcons, fields, strict=True):
        if field is None:
            continue
        if sub.name is None:
            # A Padding in construct: the C side names it "pad".
            assert field == "pad"
        else:
            assert sub.name == field
        assert c_facts[f"field:{struct}.{field}"] == (offset, size), field


@pytest.mark.timeout(60)
def test_command_numbers_match(c_facts: dict[str, Any]) -> None:
    for name, command in COMMANDS.items():
        assert c_facts[f"const:{name}"] == int(command), name


@pytest.mark.timeout(60)
def test_constants_match(c_facts: dict[str, Any]) -> None:
    for name, value in CONSTANTS.items():
        assert c_facts[f"const:{name}"] == int(value), name
    assert c_facts["magic"] == [ring.RING_MAGIC.decode(), wire.CONTROL_MAGIC.decode()]
