"""Checkpoints that a kill, a full disk or a damaged file cannot make a run lose or load
silently.

A checkpoint (one file, or a sharded FSDP2 folder) is first written as ``<name>.partial``. Once
every rank's part is on disk, rank 0 hashes it (sha256 of each file, in path order), records the
digest in the folder's manifest ``capo-checkpoints.json`` and renames it into place; the checkpoint
it replaces is kept as ``<stem>.previous<suffix>`` (``last.previous.ckpt``). The manifest names
digests, not files, so a kill between two renames never leaves a good checkpoint unrecognised: at
every moment ``last`` or its previous one is intact and listed. A checkpoint is *verified* when its
content hashes to a digest the manifest lists; a truncated, corrupted or half-written one does not.

The cost: one more checkpoint on disk (about 1.6 GB for SmolLM2-135M with AdamW in fp32), and
reading each checkpoint once to hash it after writing and once before loading (sha256 hashed
~0.5 GB/s on one core of the 2-core development machine, shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from capo_lightning.faults import inject

MANIFEST = "capo-checkpoints.json"
PARTIAL = ".partial"


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a lost mount); the previous one is intact."""


class CheckpointUnverifiedError(ValueError):
    """A checkpoint asked for by name does not match its folder's manifest."""


def previous_path(path: Path) -> Path:
    """Where the checkpoint ``path`` replaces is kept: ``last.ckpt`` -> ``last.previous.ckpt``."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (each relative path and file sha256, in order)."""
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        return digest.hexdigest()
    folder = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        folder.update(f"{file.relative_to(path).as_posix()}\0{content_digest(file)}\n".encode())
    return folder.hexdigest()


def read_manifest(folder: Path) -> list[dict[str, Any]] | None:
    """The manifest's entries (``name``, ``sha256``, ``step``, ``stat``), or None when the folder
    has none (written before verified checkpoints, or by a plain ``ModelCheckpoint``)."""
    path = folder / MANIFEST
    return json.loads(path.read_text())["checkpoints"] if path.exists() else None


def _write_manifest(folder: Path, entries: list[dict[str, Any]]) -> None:
    staging = folder / f"{MANIFEST}{PARTIAL}"
    with open(staging, "w") as handle:
        json.dump({"format": 1, "checkpoints": entries}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, folder / MANIFEST)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def verify(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the manifest entry ``path``'s content matches, "") or (None, why not); (None, "") when its
    folder keeps no manifest, so nothing can be checked."""
    entries = read_manifest(path.parent)
    if entries is None:
        return None, ""
    if not path.exists():
        return None, "missing"
    digest = content_digest(path)
    match = next((entry for entry in entries if entry["sha256"] == digest), None)
    known = any(entry["name"] == path.name for entry in entries)
    damaged = "its content does not match the manifest (truncated or corrupted)"
    why = damaged if known else "not in the manifest"
    return match, "" if match else why


def newest_verified(
    candidates: list[Path],
) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """The newest of ``candidates`` (by mtime) that verifies, its manifest entry, and the newer
    ones skipped, each with why; (None, None, all of them) when none verifies."""
    rejected = []
    for path in sorted(candidates, key=lambda p: os.stat(p).st_mtime, reverse=True):
        entry, why = verify(path)
        if entry is not None:
            return path, entry, rejected
        rejected.append((path, why))
    return None, None, rejected


def commit(
    trainer: Trainer, path: str | Path, keep_previous: bool, weights_only: bool = False
) -> None:
    """Write ``trainer``'s checkpoint to ``path`` as described in the module docstring; every rank
    calls it. A failed write raises :class:`CheckpointWriteError` naming the path; ``path`` and its
    previous one are then untouched."""
    final = Path(path)
    staging = final.with_name(final.name + PARTIAL)
    if trainer.is_global_zero:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove(staging)  # what a killed write left: never mixed into this one
    trainer.strategy.barrier("capo.checkpoint.clear")
    try:
        trainer.save_checkpoint(staging, weights_only)
    except Exception as error:
        raise CheckpointWriteError(
            f"capo: writing the checkpoint {final} failed ({type(error).__name__}: {error}); the "
            f"checkpoints already in {final.parent} are intact. Free space (or fix the mount) and "
            "resume with --ckpt_path last"
        ) from error
    inject("checkpoint_shard")  # this rank's part is on disk, the checkpoint is not committed yet
    trainer.strategy.barrier("capo.checkpoint.written")
    if trainer.is_global_zero:
        _install(final, staging, keep_previous, trainer.global_step)
    trainer.strategy.barrier("capo.checkpoint.committed")


def _stat(path: Path) -> list[int]:
    """[bytes, newest mtime in ns] of a file or a folder's files: what a truncation or a rewrite
    changes, checked without reading the content."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [file.stat() for file in files]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def _install(final: Path, staging: Path, keep_previous: bool, step: int) -> None:
    entries = read_manifest(final.parent) or []
    digest = content_digest(staging)
    new = {"name": final.name, "sha256": digest, "step": step, "stat": _stat(staging)}
    _write_manifest(final.parent, entries + [new])  # both the old and the new content are listed
    previous = previous_path(final)
    replaced = next((e for e in entries if e["name"] == final.name), None)
    # the one replaced becomes the previous only if untouched since it was written (a damaged
    # ``last`` a run fell back from must not push out the good previous one)
    untouched = replaced is not None and final.exists() and replaced.get("stat") == _stat(final)
    rotate = keep_previous and untouched
    if rotate:
        _remove(previous)
        os.replace(final, previous)
    else:
        _remove(final)
    os.replace(staging, final)
    renamed = [{**replaced, "name": previous.name}] if rotate else []
    moved = (final.name, previous.name) if rotate else (final.name,)
    kept = [e for e in entries if e["name"] not in moved and (final.parent / e["name"]).exists()]
    _write_manifest(final.parent, kept + renamed + [new])


def refuse_unverified(asked: str | Path | None) -> None:
    """Raise :class:`CheckpointUnverifiedError` if the checkpoint ``asked`` for by path is in a
    folder with a manifest and does not verify; nothing for ``last``, ``best`` or a folder without
    one."""
    if not asked or str(asked) in ("last", "best", "hpc", "registry") or not Path(asked).exists():
        return
    entry, why = verify(Path(asked))
    if entry is None and why:
        previous = previous_path(Path(asked))
        hint = f" Its previous one is {previous}." if previous.exists() else ""
        raise CheckpointUnverifiedError(
            f"capo: --ckpt_path {asked}: {why}; not loading it.{hint} --ckpt_path last picks the "
            "newest checkpoint that verifies"
        )


class VerifiedCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments), committing each checkpoint atomically and
    resuming only from verified ones.

    * Every checkpoint it writes is committed by :func:`commit`; ``last`` keeps its previous one.
    * ``--ckpt_path last`` takes the newest ``last*`` checkpoint that verifies; one that does not is
      named and skipped (its previous one is tried), never loaded. When none verifies, the run stops
      with an error naming each and why, rather than training from scratch.
    * ``--ckpt_path <file>`` in a folder with a manifest must verify too (:func:`refuse_unverified`,
      which ``capo fit`` calls before Lightning reads the file).
    """

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        keep = Path(filepath).stem.startswith(self.CHECKPOINT_NAME_LAST or "last")
        commit(trainer, filepath, keep_previous=keep, weights_only=self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        candidates = [Path(p) for p in super()._find_last_checkpoints(trainer)]
        if not candidates or read_manifest(candidates[0].parent) is None:
            return {str(p) for p in candidates}  # nothing to verify against: Lightning's choice
        path, entry, rejected = newest_verified(candidates)
        if path is not None:
            for skipped, reason in rejected:
                rank_zero_info(f"capo: not resuming from {skipped}: {reason}")
            note = f" instead of {rejected[0][0]}" if rejected else ""
            rank_zero_info(f"capo: resuming from {path} (step {entry['step']}, verified){note}")
            return {str(path)}
        raise CheckpointUnverifiedError(
            "capo: --ckpt_path last: no checkpoint in "
            f"{candidates[0].parent} verifies against {MANIFEST}: "
            + "; ".join(f"{p.name}: {why}" for p, why in rejected)
            + ". Pass one with --ckpt_path <file> after checking it, or start a new run folder"
        )
