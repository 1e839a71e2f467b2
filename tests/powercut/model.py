"""What a disk may hold after a power cut at any point of a recorded history.

A cut after the first k operations keeps what the program made durable and lets a seeded
adversary decide the rest:

- A file's data and size are durable up to its last fsync/fdatasync (through any handle).
  Each file with writes or truncates after that gets one of four fates: `keep` (all of
  them reached the disk), `drop` (none did), `zeros` (the new size did, its data did not: the
  file grew by zeros), `torn` (every 4 KiB block independently holds one of the contents it
  had since the fsync, and the size is one of the sizes it had: a write partly applied,
  later writes kept while earlier ones were lost).
- A name (create, mkdir, symlink, link, unlink, rmdir, rename) is durable once its folder is
  fsynced after it; for a rename that is the destination folder. Each name operation that is
  not durable survives with the policy's probability, independently of the others; the
  survivors are applied in their original order, so each name ends as it was at some
  point since its folder's last fsync. A rename survives or not as a whole (old name or new,
  never both, never neither). What no surviving name reaches (a file whose names were all
  lost, everything in a lost folder) is gone.
- Inodes and names are separate: a file linked under a new name and unlinked from its temp
  name keeps whichever names survived, with its own data fate.

Reproducible: the same history, seed and k give the same state, byte for byte.
"""

from __future__ import annotations

import os
import random
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.powercut.history import DATA_OPS, NAME_OPS, ROOT, History, Op

BLOCK = 4096
FATES = ("keep", "drop", "zeros", "torn")


@dataclass(frozen=True)
class Policy:
    """How a cut treats what was not made durable.

    names: probability that a name operation survives without its folder's fsync (0: only
    what was fsynced, 1: all of it). data: a fate for every file with un-synced data, or
    'mixed' (each such file draws one of FATES).
    """

    names: float
    data: str

    @classmethod
    def draw(cls, rng: random.Random) -> Policy:
        names = rng.choices([0.0, 1.0, 0.5, rng.random()], weights=[35, 15, 25, 25])[0]
        data = rng.choices(["drop", "keep", "torn", "zeros", "mixed"], [30, 10, 20, 10, 30])[0]
        return cls(round(names, 3), data)

    @classmethod
    def parse(cls, text: str) -> Policy:
        """'NAMES/DATA', e.g. '0/drop' (nothing un-synced survives) or '0.5/mixed'."""
        names, _, data = text.partition("/")
        if data not in (*FATES, "mixed"):
            raise ValueError(f"data fate must be one of {', '.join(FATES)}, mixed: {text!r}")
        return cls(float(names), data)

    def __str__(self) -> str:
        return f"{self.names:g}/{self.data}"


@dataclass
class Cut:
    """The survivor state of one cut: names, and per file its content."""

    index: int  # operations kept
    seed: int
    policy: Policy
    entries: dict[tuple[int, str], int]  # (folder inode, name) -> inode
    kinds: dict[int, str]
    content: dict[int, bytes] = field(default_factory=dict)
    fates: dict[int, str] = field(default_factory=dict)  # files with un-synced data: their fate
    names_pending: int = 0
    names_kept: int = 0

    def paths(self) -> dict[str, int]:
        """Every reachable path (relative, '/'-separated) -> inode, folders first."""
        children: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for (parent, name), ino in self.entries.items():
            children[parent].append((name, ino))
        out: dict[str, int] = {}
        seen = {ROOT}
        stack = [(ROOT, "")]
        while stack:
            folder, prefix = stack.pop()
            for name, ino in sorted(children[folder]):
                path = f"{prefix}{name}"
                if self.kinds.get(ino) == "dir":
                    if ino in seen:
                        continue  # a cycle of renamed folders: unreachable
                    seen.add(ino)
                    stack.append((ino, path + "/"))
                out[path] = ino
        return out

    def materialize(self, folder: Path) -> None:
        """Write the survivor state to an empty plain folder (hard links kept as links)."""
        folder.mkdir(parents=True, exist_ok=True)
        first: dict[int, Path] = {}
        for rel, ino in sorted(self.paths().items()):
            path = folder / rel
            kind = self.kinds[ino]
            if kind == "dir":
                path.mkdir()
            elif kind.startswith("symlink:"):
                os.symlink(kind.removeprefix("symlink:"), path)
            elif ino in first:
                os.link(first[ino], path)
            else:
                path.write_bytes(self.content[ino])
                first[ino] = path


class Model:
    def __init__(self, history: History) -> None:
        self.history = history
        self.kinds: dict[int, str] = {ROOT: "dir"}
        self._name_ops: list[tuple[Op, int, int]] = []  # (op, folder that makes it durable, ino)
        self._data: dict[int, list[Op]] = defaultdict(list)
        self._syncs: dict[int, list[int]] = defaultdict(list)
        self._annotate()

    def _annotate(self) -> None:
        """Replay the names once over the whole history to learn which inode each name
        operation moved or removed (the model replays subsets of them later)."""
        live: dict[tuple[int, str], int] = {}
        for op in self.history.ops:
            a = op.args
            if op.kind in ("mkdir", "create", "symlink"):
                parent, name, ino = a[0], a[1], a[2]
                self.kinds[ino] = {"mkdir": "dir", "create": "file"}.get(
                    op.kind, f"symlink:{a[3] if len(a) > 3 else ''}"
                )
                live[(parent, name)] = ino
                self._name_ops.append((op, parent, ino))
            elif op.kind == "link":
                ino, parent, name = a
                live[(parent, name)] = ino
                self._name_ops.append((op, parent, ino))
            elif op.kind in ("unlink", "rmdir"):
                ino = live.pop((a[0], a[1]), -1)
                self._name_ops.append((op, a[0], ino))
            elif op.kind == "rename":
                sp, sn, dp, dn = a
                ino = live.pop((sp, sn), -1)
                live[(dp, dn)] = ino
                self._name_ops.append((op, dp, ino))
            elif op.kind in DATA_OPS:
                self._data[a[0]].append(op)
            elif op.kind in ("fsync", "fsyncdir"):
                self._syncs[a[0]].append(op.index)
            assert op.kind in NAME_OPS | DATA_OPS | {"fsync", "fsyncdir"}, op.kind

    def last_sync(self, ino: int, k: int) -> int:
        """Index of the last fsync of `ino` among the first k operations (-1: none)."""
        syncs = self._syncs.get(ino, [])
        i = bisect_left(syncs, k)
        return syncs[i - 1] if i else -1

    def cut(self, k: int, seed: int, policy: Policy | None = None) -> Cut:
        """The survivor state after the first `k` operations."""
        if policy is None:
            policy = Policy.draw(random.Random(f"{seed}:{k}:policy"))
        cut = Cut(k, seed, policy, {}, self.kinds)
        rng = random.Random(f"{seed}:{k}:names")
        for op, home, ino in self._name_ops:
            if op.index >= k:
                break
            if self.last_sync(home, k) < op.index:
                cut.names_pending += 1
                if not rng.random() < policy.names:
                    continue
                cut.names_kept += 1
            _apply_name(cut.entries, op, ino)
        for ino in set(cut.paths().values()):
            if self.kinds[ino] == "file":
                cut.content[ino] = self._content(cut, ino)
        return cut

    def _content(self, cut: Cut, ino: int) -> bytes:
        ops = [op for op in self._data.get(ino, []) if op.index < cut.index]
        synced = self.last_sync(ino, cut.index)
        durable = bytearray()
        for op in ops:
            if op.index < synced:
                _apply_data(durable, op)
        pending = [op for op in ops if op.index > synced]
        if not pending:
            return bytes(durable)
        rng = random.Random(f"{cut.seed}:{cut.index}:{ino}")
        fate = cut.policy.data if cut.policy.data != "mixed" else rng.choice(FATES)
        cut.fates[ino] = fate
        if fate == "drop":
            return bytes(durable)
        final = bytearray(durable)
        for op in pending:
            _apply_data(final, op)
        if fate == "keep":
            return bytes(final)
        if fate == "zeros":
            return bytes(_resized(durable, len(final)))
        return _torn(durable, pending, rng)


def _apply_name(entries: dict[tuple[int, str], int], op: Op, ino: int) -> None:
    a = op.args
    if op.kind in ("mkdir", "create", "symlink"):
        entries[(a[0], a[1])] = ino
    elif op.kind == "link":
        entries[(a[1], a[2])] = ino
    elif op.kind in ("unlink", "rmdir"):
        entries.pop((a[0], a[1]), None)
    elif op.kind == "rename":
        if entries.get((a[0], a[1])) == ino:
            del entries[(a[0], a[1])]
        entries[(a[2], a[3])] = ino


def _apply_data(buf: bytearray, op: Op) -> None:
    if op.kind == "write":
        offset, data = op.args[1], op.args[2]
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
    else:
        size = op.args[1]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))


def _resized(buf: bytearray, size: int) -> bytearray:
    out = bytearray(buf[:size])
    out.extend(bytes(size - len(out)))
    return out


def _blocks(start: int, end: int) -> Iterable[int]:
    return range(start // BLOCK, (end - 1) // BLOCK + 1) if end > start else ()


def _block(buf: bytearray, b: int) -> bytes:
    return bytes(_resized(buf[b * BLOCK : (b + 1) * BLOCK], BLOCK))


def _torn(durable: bytearray, pending: list[Op], rng: random.Random) -> bytes:
    """Each 4 KiB block holds one of the contents it had since the last fsync; the size is
    one of the sizes the file had (a size that outran its data reads as zeros)."""
    cur = bytearray(durable)
    sizes = [len(cur)]
    versions: dict[int, list[bytes]] = {}
    for op in pending:
        if op.kind == "write":
            touched = _blocks(op.args[1], op.args[1] + len(op.args[2]))
        else:
            touched = _blocks(min(len(cur), op.args[1]), max(len(cur), op.args[1]) + 1)
        for b in touched:
            versions.setdefault(b, [_block(durable, b)])
        _apply_data(cur, op)
        for b in touched:
            versions[b].append(_block(cur, b))
        sizes.append(len(cur))
    size = rng.choice(sizes)
    out = _resized(durable, size)
    for b in sorted(versions):
        if b * BLOCK < size:
            block = rng.choice(versions[b])
            end = min(size, (b + 1) * BLOCK)
            out[b * BLOCK : end] = block[: end - b * BLOCK]
    return bytes(out)
