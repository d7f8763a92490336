"""Run folders that are complete or absent.

A run (``fit``, ``predict``, the widget's Save model) is written into a staging folder beside its
destination, ``<parent>/.<name>.partial``, and moved into place only when every file is written,
with ``manifest.json`` (files, sizes, SHA-256, versions) written last. So:

- a folder under the final name always holds a whole run whose manifest matches its files; one
  without a manifest (written by napari-spatialssl < 0.2, or damaged) is reported as incomplete;
- the staging folder is locked (``flock``) while its run is alive: a second run into the same
  ``--out`` is refused at once, and the lock dies with its process, so a killed run's staging
  folder is recognised as a leftover and removed by the next run (or continued by ``--resume``);
- the destination is checked before any work: a file in the way, a folder that is not a run,
  a run that exists without ``overwrite``, a place that cannot be written.

Replacing an existing run exchanges the two folders atomically (``renameat2(RENAME_EXCHANGE)``
on Linux; elsewhere two renames, and a run killed between them is completed by the next one).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .checkpoints import sha256_file
from .data.io import SpatialDataError

MANIFEST = "manifest.json"
RUN_FORMAT = "napari-spatialssl-run/1"
STAGING_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
CHECKPOINT_DIR = "checkpoint"  # inside the staging folder: periodic training state for --resume
RUN_INFO = "run.json"  # inside the staging folder: how the run was started (for --resume)


class RunFolderError(SpatialDataError):
    """A run folder is incomplete, mixed, in use or in the way; the message says what to do."""


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def _old_path(out: Path) -> Path:
    return out.parent / f".{out.name}{OLD_SUFFIX}"


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == RUN_FORMAT else None


def verify_run(folder: str | os.PathLike, *, hashes: bool = True, files: tuple[str, ...] | None = None) -> dict:
    """The manifest of a complete run folder; a :class:`RunFolderError` naming what is wrong otherwise.

    Checks every listed file's size (and SHA-256 with ``hashes``; ``files`` limits the hashing to
    those names, e.g. the model files before predicting) and that no listed file is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: not a folder; pass the run folder written by 'fit'.")
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / "model.pt").exists() and not (folder / "model.safetensors").exists():
            raise RunFolderError(
                f"{folder}: written by napari-spatialssl < 0.2 (model.pt, no {MANIFEST}); convert it with "
                f"'napari-spatialssl convert-model {folder} NEW_FOLDER' (safe: nothing in it is executed).")
        raise RunFolderError(f"{folder}: incomplete run (no valid {MANIFEST}: the run that wrote it was interrupted "
                             "or the folder was changed); run 'fit' again (--overwrite) or '--resume' it.")
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise RunFolderError(f"{folder}: incomplete run: {name} listed in {MANIFEST} is missing; "
                                 "copy the whole folder again or re-run.")
        if path.stat().st_size != info.get("bytes"):
            raise RunFolderError(f"{folder}: {name} has {path.stat().st_size} bytes, {MANIFEST} says "
                                 f"{info.get('bytes')}: the file was truncated or replaced; copy the folder again.")
        if hashes and (files is None or name in files) and sha256_file(path) != info.get("sha256"):
            raise RunFolderError(f"{folder}: {name} does not match its SHA-256 in {MANIFEST} (changed or damaged "
                                 "after the run); copy the folder again or re-run.")
    return manifest


def is_complete_run(folder: Path) -> bool:
    try:
        verify_run(folder, hashes=False)
        return True
    except RunFolderError:
        return False


def _looks_like_run(folder: Path) -> bool:
    """Holds only files a napari-spatialssl run writes (old or new format), or nothing at all."""
    names = {p.name for p in folder.iterdir()}
    ours = {MANIFEST, "result.h5ad", "metrics.json", "config.json", "loss.csv", "model.pt", "model.safetensors",
            "model.json", RUN_INFO}
    return names <= ours or not names


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = renameat2(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_destination(out: str | os.PathLike, *, overwrite: bool = False, what: str = "--out") -> Path:
    """Refuse, before any work, a destination that a run could not be moved into (one clear line)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{what} {out}: is a file, not a folder; choose a new folder name.")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunFolderError(f"{what} {out}: {probe} is a file, so no folder can be made under it; choose another place.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what} {out}: {probe} is not writable (permission denied); choose a folder you can write to.")
    if out.is_dir():
        if any(p.is_dir() for p in out.iterdir()):
            bad = next(p.name for p in out.iterdir() if p.is_dir())
            raise RunFolderError(f"{what} {out}: holds a folder {bad!r}, so it is not a run folder; choose a new or "
                                 "empty folder (nothing in it was changed).")
        if not _looks_like_run(out):
            others = sorted(p.name for p in out.iterdir())[:5]
            raise RunFolderError(f"{what} {out}: holds files that are not a napari-spatialssl run ({others}); choose "
                                 "a new or empty folder (nothing in it was changed).")
        if any(out.iterdir()) and not overwrite:
            state = "a complete run" if is_complete_run(out) else "an incomplete run"
            raise RunFolderError(f"{what} {out}: already holds {state}; pass --overwrite (Python: overwrite=True) to "
                                 "replace it, or choose another folder.")
    return out


class RunFolder:
    """Write a run into a locked staging folder, then move it into place with its manifest.

    ``RunFolder(out, overwrite=..., resume=...)`` checks the destination and takes the lock at
    once (``open()``); write files under ``.staging``; ``commit(kind, ...)`` writes the manifest last
    and moves the folder into place; ``close()`` (or leaving the ``with`` block) without commit
    removes the staging folder unless ``keep_on_failure`` (kept so that ``--resume`` can continue a
    run that failed in evaluation; a killed process never gets there, its lock just dies).
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 what: str = "--out"):
        self.out = Path(out)
        self.overwrite = overwrite
        self.resume = resume
        self.what = what
        self.staging = staging_path(self.out)
        self._fd: int | None = None
        self.committed = False
        self.keep_on_failure = False
        self.notes: list[str] = []

    # -- opening ---------------------------------------------------------------------------
    def open(self) -> "RunFolder":
        self._recover()
        check_destination(self.out, overwrite=self.overwrite or self.resume, what=self.what)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir(exist_ok=True)
        except OSError as exc:
            from .data.io import describe_os_error

            raise RunFolderError(f"{self.what} {self.out}: cannot create a folder there ({describe_os_error(exc)}); "
                                 "choose another place.") from exc
        fd = os.open(self.staging, os.O_RDONLY)
        if not _try_lock(fd):
            os.close(fd)
            owner = _read_owner(self.staging)
            raise RunFolderError(f"{self.what} {self.out}: another run is writing it now{owner}; wait for it to "
                                 "finish or choose another folder.")
        self._fd = fd
        self.keep_on_failure = self.resume  # never delete the run that --resume is about to continue
        leftovers = [p for p in self.staging.iterdir()]
        if leftovers and not self.resume:
            for p in leftovers:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self.notes.append(f"removed the leftovers of an interrupted run into {self.out} "
                              "(use --resume to continue such a run instead)")
        elif self.resume and not (self.staging / RUN_INFO).exists():
            self.close()
            raise RunFolderError(f"--resume {self.out}: there is no interrupted run to continue (no "
                                 f"{self.staging.name}/{RUN_INFO}); start it again without --resume.")
        _write_json(self.staging / ".owner", {"pid": os.getpid(), "host": socket.gethostname(),
                                               "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        return self

    def __enter__(self) -> "RunFolder":
        return self.open() if self._fd is None else self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _recover(self) -> None:
        """Finish what a run killed during its final move left: a complete staging folder whose
        destination is missing is moved into place; an ``.old`` folder of a finished swap is removed."""
        old = _old_path(self.out)
        if self.staging.is_dir() and not self.out.exists() and read_manifest(self.staging) is not None:
            fd = os.open(self.staging, os.O_RDONLY)
            try:
                if _try_lock(fd):
                    (self.staging / ".owner").unlink(missing_ok=True)
                    os.rename(self.staging, self.out)
                    self.notes.append(f"completed the move of an interrupted run into {self.out}")
            finally:
                os.close(fd)
        if old.exists() and not self.out.exists() and read_manifest(old) is not None:
            os.rename(old, self.out)  # the replacement never arrived: keep the previous run
            self.notes.append(f"restored the previous run into {self.out} (its replacement was interrupted)")
        if old.exists() and self.out.exists():
            shutil.rmtree(old, ignore_errors=True)

    # -- while running ---------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.staging / CHECKPOINT_DIR

    def write_run_info(self, info: dict) -> None:
        _write_json(self.staging / RUN_INFO, info)

    def read_run_info(self) -> dict:
        try:
            return json.loads((self.staging / RUN_INFO).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"--resume {self.out}: the interrupted run's {RUN_INFO} is unreadable ({exc}); "
                                 "start the run again without --resume.") from exc

    # -- finishing -------------------------------------------------------------------------
    def commit(self, kind: str, *, method: str | None = None, versions: dict | None = None,
               extra: dict | None = None) -> Path:
        """Write the manifest (last), move the folder into place, release the lock."""
        from .training import package_versions

        for name in (CHECKPOINT_DIR,):
            path = self.staging / name
            if path.exists():
                shutil.rmtree(path)
        for name in (RUN_INFO, ".owner"):
            (self.staging / name).unlink(missing_ok=True)
        files = {}
        for p in sorted(self.staging.iterdir()):
            if p.name == MANIFEST or p.name.startswith("."):
                continue
            files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {"format": RUN_FORMAT, "kind": kind, "method": method,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions or package_versions(),
                    "files": files, **(extra or {})}
        for p in self.staging.iterdir():
            if p.is_file():
                _fsync_file(p)
        _write_json(self.staging / MANIFEST, manifest)
        _fsync_dir(self.staging)
        if self.out.exists():
            if not (self.overwrite or self.resume) and any(self.out.iterdir()):
                raise RunFolderError(f"{self.what} {self.out}: another run wrote it while this one was running; "
                                     "this run's results were not moved there (re-run with --overwrite).")
            if not _exchange(self.staging, self.out):
                old = _old_path(self.out)
                if old.exists():
                    shutil.rmtree(old)
                try:
                    os.rename(self.out, old)
                    os.rename(self.staging, self.out)
                except BaseException:
                    if not self.out.exists() and old.exists():  # never leave both names empty
                        os.rename(old, self.out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                shutil.rmtree(self.staging, ignore_errors=True)  # the previous run, now under the staging name
        else:
            os.rename(self.staging, self.out)
        _fsync_dir(self.out.parent)
        self.committed = True
        self._release()
        return self.out

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Without a commit: remove the staging folder (unless kept for --resume); release the lock."""
        if self._fd is not None and not self.committed and self.staging.exists():
            if self.keep_on_failure:
                (self.staging / ".owner").unlink(missing_ok=True)
            else:
                shutil.rmtree(self.staging, ignore_errors=True)
        self._release()


def _read_owner(staging: Path) -> str:
    try:
        info = json.loads((staging / ".owner").read_text())
        return f" (pid {info.get('pid')} on {info.get('host')}, started {info.get('started')})"
    except (OSError, json.JSONDecodeError):
        return ""


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError:
        pass


def file_fingerprint(path: str | os.PathLike, chunk: int = 16 << 20) -> dict:
    """Where a slide was read from and enough to tell it changed (size, mtime, SHA-256 of its first
    and last 16 MB): recorded by ``fit`` so that ``--resume`` refuses another slide."""
    import hashlib

    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as fh:
            h.update(fh.read(chunk))
            if st.st_size > 2 * chunk:
                fh.seek(-chunk, os.SEEK_END)
                h.update(fh.read(chunk))
    return {"path": str(p.resolve()), "bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
            "sha256_head_tail": h.hexdigest()}


def same_file(recorded: dict, path: str | os.PathLike) -> bool:
    now = file_fingerprint(path)
    return all(recorded.get(k) == now[k] for k in ("bytes", "sha256_head_tail"))
