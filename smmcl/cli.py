"""The options every entry point shares, defined once: ``train.py``, ``eval.py``, ``predict.py``,
``export.py`` (the experiment folders' thin wrappers call :mod:`smmcl.engine` / :mod:`smmcl.tools`),
the tools (``python -m smmcl.tools.*``) and the data check.

Each ``add_*`` adds one option to a parser, with the authors' flag names where they have one (CMX's
``engine.py`` and ``eval.py``: ``-d``, ``-c``, ``-e``, ``-p``). ``--set`` may be given several times;
every group is kept, in order (a later value of the same key wins).
"""
from __future__ import annotations

import argparse

CHECKPOINT_HELP = "an epoch of the run's checkpoint folder (500), 'last' or a .pth file"


def add_set(parser: argparse.ArgumentParser) -> None:
    """``--set key=value ...``: config overrides, applied after the experiment's ``config.py``."""
    parser.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. --set batch_size=8 dataset_path=/data/LLRGBD (repeatable)')


def add_config(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: the tools' experiment ``config.py`` (the experiment folders' scripts know theirs)."""
    parser.add_argument('--config', required=True, help="an experiment's config.py, e.g. SMMCL_NYU/config.py")


def add_devices(parser: argparse.ArgumentParser, default=None) -> None:
    """``-d/--devices``: GPUs as the authors write them, ``0-3`` or ``0,2``: one process per GPU."""
    parser.add_argument('-d', '--devices', default=default,
                        help="GPUs, e.g. '0-3' or '0,2': one process per GPU (default: GPU 0, else the CPU)")


def add_device(parser: argparse.ArgumentParser) -> None:
    """``-d/--device``: the one device of a single-process tool."""
    parser.add_argument('-d', '--device', default=None, help="'cpu' or one GPU index (default: GPU 0 if any)")


def add_checkpoint(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``-e/--epoch``: one checkpoint (default ``last``, the authors' default)."""
    parser.add_argument('-e', '--epoch', '--epochs', dest='epoch', default=None if required else 'last',
                        required=required, metavar='CHECKPOINT', help=CHECKPOINT_HELP)


def add_epochs(parser: argparse.ArgumentParser) -> None:
    """``-e/--epochs``: the authors' ``eval.py`` choice of checkpoints, one or a range."""
    parser.add_argument('-e', '--epochs', default='last',
                        help="epoch (500), range (400-500), open range (450-), 'last' or a .pth file")


def add_resume(parser: argparse.ArgumentParser) -> None:
    """``-c/--continue``: the authors' resume flag, plus ``auto``."""
    parser.add_argument('-c', '--continue', dest='resume', metavar='FILE',
                        help="resume from a checkpoint, e.g. log_.../checkpoint/epoch-last.pth; 'auto': from "
                             "the newest in the run's checkpoint folder, or start fresh when there is none")


def add_port(parser: argparse.ArgumentParser, *flags: str) -> None:
    """The rendezvous port of several GPU processes (``-p`` in the authors' training, ``--port`` in
    evaluation, where ``-p`` is the save path)."""
    parser.add_argument(*(flags or ('--port',)), dest='port', type=int, default=None,
                        help='rendezvous port for several GPUs (default: a free one)')


def add_local_rank(parser: argparse.ArgumentParser) -> None:
    """``--local_rank``: passed by ``torch.distributed.launch`` (the authors' launcher); the
    environment's ``LOCAL_RANK`` wins."""
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
