"""What the command line shares with the modules that define commands of their own (``plan``): progress bars
(tqdm on stderr, shown on a terminal unless ``-q``) and option types."""

import argparse
import sys

__all__ = ["show_progress", "progress_bar", "blocksize"]


def blocksize(text):
    """The ``--blocksize`` option: one of the block sizes bitsandbytes takes."""
    from .constants import BLOCKSIZES
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in BLOCKSIZES:
        raise argparse.ArgumentTypeError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, not {text}")
    return value


def show_progress(args):
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def progress_bar(args, total, desc, unit="beat"):
    """A tqdm bar on stderr (shown on a terminal, without --quiet) and its ``update(done, total=None)``."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, unit_scale=total is None,
               disable=not show_progress(args))

    def update(done, _total=None):
        bar.update(done - bar.n)
    return bar, update
