"""Small helpers shared across the package: atomic file writes, file hashes, progress reporting, a shared flag."""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sibling_temp_file(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new, empty hidden file beside ``path`` (same folder, so renaming it onto ``path`` is atomic), with
    the permissions a plain new file would get (mkstemp makes files private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def _synced_temp_copy(path: str | Path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path``, flushed to disk (removed again if writing fails)."""
    tmp = sibling_temp_file(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    atomic_write_set({path: data})


def atomic_write_set(files: dict[str | Path, str | bytes]) -> None:
    """Replace several files as one set, as nearly as a file system allows: every content (str or bytes) is
    written and synced to a temporary file first, and only then are they all renamed into place, so a failure
    while writing (a full disk) leaves every file as it was."""
    temps: dict[str | Path, Path] = {}
    try:
        for path, content in files.items():
            temps[path] = _synced_temp_copy(path, content.encode("utf-8") if isinstance(content, str) else content)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch  # here, not at the top: this module is the CLI parser's and stays torch-free
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def progress_bar(iterable, desc: str, unit: str = "batch", every_s: float = 60.0):
    """tqdm on a terminal. Off one (nohup, a CI log) tqdm hides itself and a long pass (an hour of soft labels)
    would be silent: log "desc: i/total unit, rate" about every ``every_s`` seconds instead, and once at the end."""
    if sys.stderr.isatty():
        yield from tqdm(iterable, desc=desc, unit=unit)
        return
    log = logging.getLogger("race_classifier.progress")
    total = len(iterable) if hasattr(iterable, "__len__") else None
    started = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s or done == total:
            of = f"/{total}" if total is not None else ""
            log.info("%s: %d%s %s, %.2f %s/s", desc, done, of, unit, done / max(now - started, 1e-9), unit)
            last = now


def add_amp_argument(parser) -> None:
    """--amp for the commands that run a model file (predict, serve, evaluate, soft-labels): device.resolve_precision."""
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                        help="run a PyTorch model under autocast: bf16 (faster on CPUs with bf16 units and on GPUs) "
                             "or fp16 (CUDA only); probabilities move slightly (docs/deployment.md). ONNX "
                             "files run as exported")


# Older spellings that keep working, hidden from --help: the seed documents' style is --model_path, --batch_size.
FLAG_ALIASES = {"--model_path": ("--model",)}


def add_hidden_aliases(parser) -> None:
    """For every --flag_with_underscores of ``parser``, accept --flag-with-dashes too (and FLAG_ALIASES), as
    extra option strings of the same argument (so a required flag given by its alias counts as given), left
    out of --help by the parser's formatter."""
    class HiddenAliasesFormatter(parser.formatter_class):
        def _format_action_invocation(self, action):
            hidden = getattr(action, "hidden_aliases", ())
            if not hidden:
                return super()._format_action_invocation(action)
            shown = argparse.Action([s for s in action.option_strings if s not in hidden], action.dest,
                                    nargs=action.nargs, metavar=action.metavar)
            return super()._format_action_invocation(shown)

    for action in list(parser._actions):
        aliases = [alias for flag in list(action.option_strings)
                   for alias in (*FLAG_ALIASES.get(flag, ()), *(("--" + flag[2:].replace("_", "-"),) if "_" in flag else ()))
                   if alias not in parser._option_string_actions]
        for alias in aliases:  # argparse has no public way to add an option string to an existing argument
            action.option_strings.append(alias)
            parser._option_string_actions[alias] = action
        if aliases:
            action.hidden_aliases = (*getattr(action, "hidden_aliases", ()), *aliases)
    parser.formatter_class = HiddenAliasesFormatter

    # argparse names an argument in its errors by every option string ("--train_txt/--train-txt is
    # required"): name it as --help does. Longest first, so that "/--model" cannot cut "/--model-path".
    hidden = sorted({a for action in parser._actions for a in getattr(action, "hidden_aliases", ())},
                    key=len, reverse=True)
    report = parser.error

    def error(message: str):
        for alias in hidden:
            message = message.replace(f"/{alias}", "")
        report(message)
    parser.error = error


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_command(func, args) -> int:
    """Run a subcommand; bad input (unknown label, malformed line, missing file) is one clear line, exit 2."""
    setup_logging()
    try:
        return func(args)
    except (ValueError, FileNotFoundError) as e:
        logging.getLogger("race_classifier").error("%s", e)
        return 2
