"""Logging for training: messages to stderr and (rank 0) a log file, like CMX's ``get_logger``."""
from __future__ import annotations

import logging
import os
import os.path as osp
import sys
from typing import Optional

_FORMAT = '[%(asctime)s %(levelname)s] %(message)s'
_MARK = '_smmcl_handler'


def setup_logging(log_file: Optional[str] = None, rank: int = 0, name: str = 'smmcl') -> logging.Logger:
    """Configure the package logger: INFO on rank 0 (WARNING on the others, prefixed with the rank)
    to stderr and, when ``log_file`` is given, from DEBUG on to that file (long records such as the
    effective config are logged at DEBUG, so they go to the file only).

    Calling it again (a second run in the same process, as tests do) replaces the handlers it added
    before instead of duplicating every line.
    """
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(handler)
        handler.close()
    console_level = logging.INFO if rank == 0 else logging.WARNING
    logger.setLevel(logging.DEBUG if log_file else console_level)
    fmt = logging.Formatter(_FORMAT if rank == 0 else f'[rank {rank}] {_FORMAT}', '%Y-%m-%d %H:%M:%S')
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    handlers = [console]
    if log_file:
        os.makedirs(osp.dirname(osp.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
    return logger


def link_last(path: str, link: str) -> None:
    """Point the symlink ``link`` at ``path`` (the authors' ``link_file``: ``val_last.log`` -> the newest
    ``val_<time>.log``), replacing an earlier link or file of that name.

    The link is relative when both live in one folder, so it survives moving the folder. Where the file
    system refuses symlinks, or ``link`` is a folder, a warning says so and nothing changes.
    """
    target = osp.abspath(path)
    link = osp.abspath(link)
    if osp.dirname(target) == osp.dirname(link):
        target = osp.basename(target)
    try:
        if osp.islink(link) or osp.isfile(link):
            os.remove(link)
        os.symlink(target, link)
    except OSError as exc:
        logging.getLogger(__name__).warning('could not link %s to %s: %s', link, path, exc)
