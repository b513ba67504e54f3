"""Output files: checked before the work that fills them, written whole or not at all.

Every file the tool writes (safetensors outputs, VCD waveforms, build reports, netlists) goes through
:func:`atomic_output`: the writer fills a temporary file in the destination's folder, which is renamed over the
destination only when the writer has finished. An interrupted or failed run (Ctrl-C, a full disk) leaves neither a
truncated file nor a destroyed older one. :func:`check_output` finds a destination that cannot be written before
any long work starts. Both raise :class:`OutputError`, whose message is one line.
"""

import contextlib
import os
import shutil
import tempfile

__all__ = ["OutputError", "check_output", "atomic_output", "atomic_output_files"]


class OutputError(Exception):
    """An output file cannot be written; ``str(error)`` is one line naming the file and the reason."""


def _reason(error):
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    text = str(error).strip()
    # safetensors' I/O errors carry the OS message inside a Rust debug string: keep the readable part
    for marker in ('message: "', "message: '"):
        if marker in text:
            return text.split(marker, 1)[1].split(marker[-1], 1)[0]
    return text.splitlines()[0] if text else type(error).__name__


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path, what="output"):
    """Raise :class:`OutputError` unless a file can be written at ``path``.

    Refused: a folder, a missing folder, a folder the user cannot create files in, an existing file that is not a
    regular file or that is read-only. The check creates and removes an empty file beside ``path``, so it also
    finds read-only file systems and full quotas of inodes. Returns ``path`` as given.
    """
    text = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(text))
    if text == "" or text.endswith(os.sep):
        raise OutputError(f"{what} {text!r} is not a file name")
    if os.path.isdir(text):
        raise OutputError(f"{what} {text} is a folder, not a file")
    if not os.path.isdir(folder):
        raise OutputError(f"{what} {text}: folder {folder} does not exist")
    if os.path.lexists(text):
        if not os.path.isfile(text):
            raise OutputError(f"{what} {text} exists and is not a regular file")
        if not os.access(text, os.W_OK):
            raise OutputError(f"{what} {text} exists and is read-only")
    try:
        probe, probe_path = tempfile.mkstemp(prefix=f".{os.path.basename(text)}.", suffix=".check", dir=folder)
        os.close(probe)
        os.unlink(probe_path)
    except OSError as error:
        raise OutputError(f"{what} {text}: cannot write in folder {folder} ({_reason(error)})") from None
    return path


@contextlib.contextmanager
def atomic_output(path, mode=None):
    """Write ``path`` through a temporary file in its folder, renamed over ``path`` when the block ends normally.

    With ``mode`` (``"w"``, ``"wb"``) the block gets an open file; without it, the temporary file's path (for
    writers that open the file themselves, such as ``safetensors.torch.save_file``). If the block raises, the
    temporary file is removed and ``path`` is untouched; an ``OSError`` or a safetensors error from the writer (a
    full disk) becomes :class:`OutputError`, anything else (``KeyboardInterrupt``) passes through. The new file gets
    the permissions a plain ``open`` would give it (those of the file it replaces, if any).
    """
    text = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(text))
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(text)}.", suffix=".part", dir=folder)
        os.close(handle)
    except OSError as error:
        raise OutputError(f"cannot write {text} ({_reason(error)})") from None
    try:
        if mode is None:
            yield temp
        else:
            with open(temp, mode) as f:
                yield f
        try:
            mode_bits = os.stat(text).st_mode & 0o7777
        except OSError:
            mode_bits = 0o666 & ~_umask()
        # after the writer: some (safetensors) replace the file they are given
        os.chmod(temp, mode_bits)
        os.replace(temp, text)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":
            raise OutputError(f"cannot write {text} ({_reason(error)})") from None
        raise


@contextlib.contextmanager
def atomic_output_files(folder):
    """Like :func:`atomic_output` for a writer that fills a folder (``save_pretrained``): the block gets an empty
    temporary folder inside ``folder`` (created if missing), and when it ends normally each file written there is
    renamed over its namesake in ``folder``. If the block raises, ``folder`` keeps its files as they were."""
    text = os.fspath(folder)
    try:
        os.makedirs(text, exist_ok=True)
        temp = tempfile.mkdtemp(prefix=".partial.", dir=text)
    except OSError as error:
        raise OutputError(f"cannot write in {text} ({_reason(error)})") from None
    try:
        yield temp
        for root, _, files in os.walk(temp):
            target = os.path.join(text, os.path.relpath(root, temp))
            os.makedirs(target, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(target, name))
    except BaseException as error:
        if isinstance(error, OSError):
            raise OutputError(f"cannot write in {text} ({_reason(error)})") from None
        raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
