"""Per-application access policy of the guest-visible metadata file system.

A TOML file of rules, matched in order against the tree path ("" is the root, "instance"
the directory, "instance/zone" a value); the first rule whose `path` (an fnmatch pattern,
where `*` also matches '/') matches decides:

    [[rule]]
    path = "secrets/*"
    read = { uids = [0], gids = [] }
    write = { uids = [], gids = [] }

A grant allows a caller whose uid is in `uids` or whose gid (the primary gid FUSE sends)
is in `gids`. "Everybody" is `uids = ["*"]` (or `gids = ["*"]`) or a table without `uids`;
a rule without a `read` or `write` table grants that access to nobody.

When no rule of the file matches, the built-in defaults apply (they are also the whole
policy of `Policy.default()`):

    secrets, secrets/*        read: root only     write: nobody
    attributes, attributes/*  read: everybody     write: root only
    everything else           read: everybody     write: nobody

Writing "attributes" (the directory) means creating keys in it. The file system refuses
writes outside attributes/<key> whatever the policy says; the policy can only narrow that.

`mode()` is the permission bits the guest sees: owner root:root; the owner bits follow
what the rule grants uid 0, the group and other bits are set only when the rule grants the
access to everybody; directories get x wherever they get r. A rule granting specific
non-root uids therefore shows no group/other bits, and since virtio-fs mounts check mode
bits in the guest kernel (default_permissions), such callers are refused by the guest
kernel before the request reaches the host.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_RULE_KEYS = {"path", "read", "write"}
_GRANT_KEYS = {"uids", "gids"}
_WILDCARD = "*"


class PolicyError(ValueError):
    """The policy file is malformed."""


@dataclass(frozen=True)
class Grant:
    """Who may do one kind of access; `uids` None means everybody."""

    uids: frozenset[int] | None
    gids: frozenset[int]

    @property
    def everybody(self) -> bool:
        return self.uids is None

    def allows(self, uid: int, gid: int) -> bool:
        return self.uids is None or uid in self.uids or gid in self.gids


NOBODY = Grant(frozenset(), frozenset())
EVERYBODY = Grant(None, frozenset())
ROOT_ONLY = Grant(frozenset({0}), frozenset())


@dataclass(frozen=True)
class Rule:
    pattern: str
    read: Grant
    write: Grant

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.pattern)


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("secrets", ROOT_ONLY, NOBODY),
    Rule("secrets/*", ROOT_ONLY, NOBODY),
    Rule("attributes", EVERYBODY, ROOT_ONLY),
    Rule("attributes/*", EVERYBODY, ROOT_ONLY),
    Rule("*", EVERYBODY, NOBODY),
)


def _ids(value: Any, where: str) -> frozenset[int] | None:
    """A list of ids; None if it holds the wildcard."""
    if not isinstance(value, list):
        raise PolicyError(f'{where} must be a list of ids or "*"')
    ids: set[int] = set()
    for item in value:
        if item == _WILDCARD:
            return None
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 1 << 32:
            raise PolicyError(f'{where}: {item!r} is not an id (0..2^32-1) or "*"')
        ids.add(item)
    return frozenset(ids)


def _grant(table: Any, where: str) -> Grant:
    if table is None:
        return NOBODY
    if not isinstance(table, dict):
        raise PolicyError(f"{where} must be a table like {{ uids = [0], gids = [] }}")
    unknown = set(table) - _GRANT_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
    uids = _ids(table["uids"], f"{where}.uids") if "uids" in table else None
    gids = _ids(table.get("gids", []), f"{where}.gids")
    if gids is None:  # every group: everybody
        return EVERYBODY
    return Grant(uids, gids)


class Policy:
    def __init__(self, rules: Sequence[Rule]) -> None:
        """`rules` are tried first, then DEFAULT_RULES (which end in a catch-all)."""
        self.rules: tuple[Rule, ...] = (*rules, *DEFAULT_RULES)

    @classmethod
    def default(cls) -> Policy:
        return cls(())

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a TOML policy file; PolicyError (or OSError) if it cannot be used."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: {exc}") from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "policy") -> Policy:
        unknown = set(data) - {"rule"}
        if unknown:
            raise PolicyError(f"{source}: unknown top-level keys {sorted(unknown)}")
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list):
            raise PolicyError(f"{source}: 'rule' must be an array of tables ([[rule]])")
        rules = []
        for index, raw in enumerate(raw_rules):
            where = f"{source}: rule {index + 1}"
            if not isinstance(raw, dict):
                raise PolicyError(f"{where} must be a table")
            unknown = set(raw) - _RULE_KEYS
            if unknown:
                raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
            pattern = raw.get("path")
            if not isinstance(pattern, str):
                raise PolicyError(f"{where}: 'path' (a string pattern) is required")
            rules.append(
                Rule(
                    pattern.strip("/"),
                    _grant(raw.get("read"), f"{where}.read"),
                    _grant(raw.get("write"), f"{where}.write"),
                )
            )
        return cls(rules)

    def rule_for(self, path: str) -> Rule:
        path = path.strip("/")
        for rule in self.rules:
            if rule.matches(path):
                return rule
        raise AssertionError("the default rules end with a catch-all")  # pragma: no cover

    def allows(self, path: str, uid: int, gid: int, write: bool) -> bool:
        rule = self.rule_for(path)
        return (rule.write if write else rule.read).allows(uid, gid)

    def mode(self, path: str, is_dir: bool) -> int:
        """Permission bits (no file type bits) the guest sees for `path`."""
        rule = self.rule_for(path)
        read = 0o5 if is_dir else 0o4
        mode = 0
        if rule.read.allows(0, 0):
            mode |= read << 6
        if rule.write.allows(0, 0):
            mode |= 0o2 << 6
        if rule.read.everybody:
            mode |= read << 3 | read
        if rule.write.everybody:
            mode |= 0o2 << 3 | 0o2
        if is_dir:
            # Everyone may search a directory (names are not secret, contents are), so a
            # lookup of what the policy refuses reaches the host, which refuses and logs it.
            mode |= 0o111
        return mode
