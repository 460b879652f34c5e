"""The C headers a C program would include agree with the construct declarations.

csrc/vpv_control.h mirrors the control messages (vhost_pv/control/wire.py),
csrc/vpv_ring.h the quarantine ring on disk (vhost_pv/volume/ring.py), csrc/virtio_blk.h and
csrc/vring.h the virtio facts (vhost_pv/virtio/), and csrc/vhost_pv.h the volume states and
policies (vhost_pv/volume/header.py). A small C program is compiled against them and prints
every struct size, field offset and constant; every #define of a mirrored family must have
its Python member, and the other way round.
"""

from __future__ import annotations

import enum
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from construct import Struct

from vhost_pv._native import lib
from vhost_pv.control import wire
from vhost_pv.guard.guard import OUTCOME_NAMES
from vhost_pv.virtio import blk as virtio_blk
from vhost_pv.virtio import ring as virtio_ring
from vhost_pv.volume import ring
from vhost_pv.volume.header import ReadPolicy, RingFullPolicy, VolumeState

CSRC = Path(__file__).resolve().parents[2] / "csrc"

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
    "vpv_ctl_volume_set": (
        wire.VolumeSetRequest,
        ["volume", "mask", "read_policy", "ring_full_policy", "ttl_action", None, "ttl_seconds",
         "allowed_uids", "allowed_gids", "owner", "owner_pid", None],
    ),
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
    "vpv_blk_config": (
        virtio_blk.VirtioBlkConfig,
        ["capacity", "size_max", "seg_max", "cylinders", "heads", "sectors", "blk_size",
         "physical_block_exp", "alignment_offset", "min_io_size", "opt_io_size", "writeback", None,
         "num_queues", "max_discard_sectors", "max_discard_seg", "discard_sector_alignment",
         "max_write_zeroes_sectors", "max_write_zeroes_seg", "write_zeroes_may_unmap", None],
    ),
    "blk_req_header": (virtio_blk.RequestHeader, ["type", "reserved", "sector"]),
    "blk_discard_segment": (virtio_blk.DiscardSegment, ["sector", "num_sectors", "flags"]),
}

# C structs without a construct layout: only their size is a Python fact.
SIZES = {
    "vring_desc": virtio_ring.DESC_SIZE,
    "vring_used_elem": virtio_ring.USED_ELEM_SIZE,
}

# Families of #defines that a Python enum mirrors member for member: (header, prefix, enum).
# The C name is the prefix plus the member's name.
MIRRORS: list[tuple[str, str, type[enum.IntEnum]]] = [
    ("virtio_blk.h", "VIRTIO_BLK_T_", virtio_blk.RequestType),
    ("virtio_blk.h", "VIRTIO_BLK_S_", virtio_blk.Status),
    ("virtio_blk.h", "VIRTIO_BLK_F_", virtio_blk.BlkFeature),
    ("vhost_pv.h", "VPV_STATE_", VolumeState),
    ("vhost_pv.h", "VPV_READ_", ReadPolicy),
    ("vhost_pv.h", "VPV_RING_FULL_", RingFullPolicy),
]

COMMANDS = {
    "VPV_IOC_STATUS": wire.Command.STATUS,
    "VPV_IOC_PERSISTENT_DISK_DANGLING": wire.Command.PERSISTENT_DISK_DANGLING,
    "VPV_IOC_RECLAIM": wire.Command.RECLAIM,
    "VPV_IOC_RING": wire.Command.RING,
    "VPV_IOC_DELETE": wire.Command.DELETE,
    "VPV_IOC_ALERTS": wire.Command.ALERTS,
    "VPV_IOC_BIND": wire.Command.BIND,
    "VPV_IOC_META": wire.Command.META,
    "VPV_IOC_VOLUME_SET": wire.Command.VOLUME_SET,
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
    "VPV_CTL_SET_TTL": wire.SET_TTL,
    "VPV_CTL_SET_TTL_ACTION": wire.SET_TTL_ACTION,
    "VPV_CTL_SET_READ_POLICY": wire.SET_READ_POLICY,
    "VPV_CTL_SET_RING_FULL_POLICY": wire.SET_RING_FULL_POLICY,
    "VPV_CTL_SET_ALLOWED_UIDS": wire.SET_ALLOWED_UIDS,
    "VPV_CTL_SET_ALLOWED_GIDS": wire.SET_ALLOWED_GIDS,
    "VPV_CTL_SET_OWNER": wire.SET_OWNER,
    "VPV_CTL_CLEAR_OWNER": wire.CLEAR_OWNER,
    "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP": virtio_blk.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    "VPV_MAX_DISCARD_SECTORS": virtio_blk.MAX_DISCARD_SECTORS,
    "VPV_MAX_DISCARD_SEGMENTS": virtio_blk.MAX_DISCARD_SEGMENTS,
    "VPV_SEG_MAX": virtio_blk.SEG_MAX,
    "VPV_SECTOR_SIZE": virtio_blk.SECTOR_SIZE,
    "VRING_DESC_F_NEXT": virtio_ring.VRING_DESC_F_NEXT,
    "VRING_DESC_F_WRITE": virtio_ring.VRING_DESC_F_WRITE,
    "VRING_DESC_F_INDIRECT": virtio_ring.VRING_DESC_F_INDIRECT,
    "VRING_AVAIL_F_NO_INTERRUPT": virtio_ring.VRING_AVAIL_F_NO_INTERRUPT,
    "VRING_USED_F_NO_NOTIFY": virtio_ring.VRING_USED_F_NO_NOTIFY,
}


def header_defines(header: str, prefix: str) -> list[str]:
    """Names of the #defines in csrc/HEADER that start with PREFIX."""
    pattern = re.compile(rf"^#define\s+({re.escape(prefix)}\w+)\s", re.MULTILINE)
    return pattern.findall((CSRC / header).read_text())


MIRRORED = {name for header, prefix, _ in MIRRORS for name in header_defines(header, prefix)}
EVENTS = header_defines("vhost_pv.h", "VPV_EVENT_")


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
        '#include "virtio_blk.h"',
        '#include "vring.h"',
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
    for struct in SIZES:
        lines.append(f'    printf("size {struct} %zu\\n", sizeof(struct {struct}));')
    for name in (*COMMANDS, *CONSTANTS, *sorted(MIRRORED), *EVENTS):
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


@pytest.mark.timeout(60)
def test_struct_sizes_match(c_facts: dict[str, Any]) -> None:
    for struct, size in SIZES.items():
        assert c_facts[f"size:{struct}"] == size, struct


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("header", "prefix", "mirror"), MIRRORS, ids=[prefix for _, prefix, _ in MIRRORS])
def test_enum_mirrors_header(
    c_facts: dict[str, Any], header: str, prefix: str, mirror: type[enum.IntEnum]
) -> None:
    """Same names, same values: a define added on one side only fails here."""
    c_names = set(header_defines(header, prefix))
    assert c_names == {prefix + member.name for member in mirror}
    for member in mirror:
        assert c_facts[f"const:{prefix}{member.name}"] == member.value, member


@pytest.mark.timeout(60)
def test_dangling_event_outcomes_named(c_facts: dict[str, Any]) -> None:
    """Every outcome the data path reports (VPV_EVENT_*) has the guard's name for it."""
    assert EVENTS
    values = [c_facts[f"const:{name}"] for name in EVENTS]
    assert sorted(values) == sorted(OUTCOME_NAMES)
    assert [getattr(lib, name) for name in EVENTS] == values


@pytest.mark.timeout(60)
def test_config_offsets_are_the_layout() -> None:
    """config_offset (the load generator reads size_max and num_queues with it) walks the
    same layout the C struct was checked against."""
    assert virtio_blk.CONFIG_SIZE == 60
    assert virtio_blk.config_offset("size_max") == 8
    assert virtio_blk.config_offset("num_queues") == 34
    with pytest.raises(KeyError):
        virtio_blk.config_offset("nonsense")
