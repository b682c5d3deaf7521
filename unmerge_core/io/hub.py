"""Models and adapters by Hugging Face Hub id: ``owner/name`` or ``owner/name@revision``.

Wherever a model or adapter directory is expected (``unmerge attribute``'s targets, ``--base`` and
``--adapter``; a manifest's ``base`` and ``[[targets]]``; the ``adapters`` trainer's ``paths``; an
adapter's ``base_model_name_or_path`` for the merge methods defined on full weights), a value that is
not an existing local path but has the form of a Hub repository id is fetched with
``huggingface_hub.snapshot_download`` into the usual Hugging Face cache and read from there:

- only what the toolkit reads is fetched: configs, the safetensors weights and their index (and the
  tokenizer files, which ``--verify`` needs for the base);
- ``@revision`` pins a branch, tag or commit; without it the default branch is used;
- the cache is reused (``HF_HUB_CACHE`` / ``HF_HOME`` are honoured), and with ``HF_HUB_OFFLINE=1``
  nothing is asked of the network: a reference must already be in the cache;
- a repository with only pickle weights (``pytorch_model.bin``) is refused unless the caller allows
  pickle (``--allow-pickle``); the ``.bin`` files are then fetched and read with ``weights_only=True``;
- a branch or tag is read from the cache's ``refs/`` only when it holds a commit hash (40 hex
  characters): a damaged or poisoned ``refs/main`` never leads to a folder outside the cache;
- every failure (no such repository or revision, not cached while offline, a partial snapshot, a
  snapshot whose weights were never fetched) is one line naming the reference.

A local path always wins: ``org/model`` that exists on disk is that directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from unmerge_core.errors import UnmergeError, short_repr

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                    r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*))?$")
"""``owner/name[@revision]``: the form of a Hub reference (checked before any network access)."""
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
"""The name of a snapshot folder in the Hugging Face cache (a git commit hash)."""

CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json")
SAFETENSORS_FILES = ("*.safetensors", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
PICKLE_FILES = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub reference."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def name(self) -> str:
        """The repository's own name (``owner/name`` → ``name``), a default display name."""
        return self.repo_id.split("/", 1)[1]


def parse_hub_ref(value: str, relative_to: Path | None = None) -> HubRef | None:
    """The Hub reference ``value`` stands for, or ``None`` when it is a local path.

    ``value`` is local when it exists (relative to ``relative_to`` when given, else to the current
    directory), starts like a path (``/``, ``.``, ``~``) or is not of the form ``owner/name[@revision]``.
    """
    candidate = Path(value).expanduser()
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to / candidate
    if candidate.exists() or value.startswith(("/", ".", "~")):
        return None
    match = HUB_ID.fullmatch(value)  # not match: "$" would accept a final newline
    if match is None:
        return None
    return HubRef(match["repo"], match["revision"])


def _exists(value: str, relative_to: Path | None) -> bool:
    path = Path(value).expanduser()
    try:
        return (relative_to / path if relative_to is not None and not path.is_absolute() else path).exists()
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read at each call, so a test or a shell can switch it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str | None:
    """The Hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``huggingface_hub``'s default."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return cache
    if home := os.environ.get("HF_HOME"):
        return str(Path(home) / "hub")
    return None


def resolve_model_ref(value: str | Path, what: str, *, relative_to: Path | None = None, allow_pickle: bool = False,
                      tokenizer: bool = False) -> Path:
    """A local directory for ``value``: the path itself, or the cached snapshot of a Hub reference.

    Args:
        value: A local path, or ``owner/name[@revision]``.
        what: How the caller names the value in errors (``"--base"``, ``"targets[0].path"``, …).
        relative_to: Folder a relative local path is taken from (a manifest's folder).
        allow_pickle: Fetch ``pytorch_model.bin`` weights when the repository has no safetensors.
        tokenizer: Also fetch the tokenizer files (for a base model that will be run).

    Raises:
        UnmergeError: one line, when the reference cannot be resolved.
    """
    text = str(value)
    if not text.isprintable() and not _exists(text, relative_to):  # quoted: the error stays on one line
        raise UnmergeError(f"{what} {short_repr(text, 80)}: holds a line break or another control character; a "
                           "model is a local path or a Hub id owner/name[@revision]")
    ref = parse_hub_ref(text, relative_to)
    if ref is None:
        path = Path(text).expanduser()
        return relative_to / path if relative_to is not None and not path.is_absolute() else path
    if ref.revision is not None and ".." in ref.revision.split("/"):
        raise UnmergeError(f"{what} {ref}: a revision may not contain '..'")
    patterns = CONFIG_FILES + SAFETENSORS_FILES + (TOKENIZER_FILES if tokenizer else ())
    offline = hub_offline()
    folder = _snapshot(ref, what, patterns, offline, hub_cache_dir())
    if any(folder.rglob("*.safetensors")):
        return folder
    if offline and not any(folder.rglob("pytorch_model*.bin")):
        # offline, a snapshot folder holds what was fetched, not what the repository has: a folder
        # with its config only says nothing about the repository's weights
        revision = f"revision '{ref.revision}'" if ref.revision else "its default branch"
        raise UnmergeError(f"{what} {ref}: the weights are not in the Hugging Face cache ({revision} has only "
                           "its config files cached) while HF_HUB_OFFLINE is set: fetch it once with "
                           "network access")
    if not allow_pickle:
        raise UnmergeError(f"{what} {ref}: the repository has no safetensors weights; pickle weights "
                           "(pytorch_model.bin) are refused: pass --allow-pickle to read them with "
                           "torch.load(weights_only=True)")
    return _snapshot(ref, what, patterns + PICKLE_FILES, offline, hub_cache_dir())


def _snapshot(ref: HubRef, what: str, patterns: tuple[str, ...], offline: bool, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=list(patterns),
                                        cache_dir=cache_dir, local_files_only=offline))
    except HFValidationError:
        raise UnmergeError(f"{what} {ref}: no such local path, and not a valid Hub repository id "
                           "(owner/name[@revision])") from None
    except GatedRepoError:
        raise UnmergeError(f"{what} {ref}: the repository is gated: accept its terms on the Hub and log in "
                           "(hf auth login)") from None
    except RevisionNotFoundError:
        raise UnmergeError(f"{what} {ref}: the repository has no revision '{ref.revision}'") from None
    except RepositoryNotFoundError:
        raise UnmergeError(f"{what} {ref}: no such local path, and no such repository on the Hub (or it is "
                           "private: log in with hf auth login)") from None
    except IncompleteSnapshotError:
        raise UnmergeError(f"{what} {ref}: the cached snapshot is incomplete (an interrupted download); "
                           "run again with network access to finish it") from None
    except LocalEntryNotFoundError:
        revision = f"revision '{ref.revision}'" if ref.revision else "its default branch"
        if offline:
            raise UnmergeError(f"{what} {ref}: no such local path, and {revision} is not in the Hugging Face "
                               "cache while HF_HUB_OFFLINE is set: fetch it once with network access") from None
        raise UnmergeError(f"{what} {ref}: no such local path, the Hub cannot be reached and {revision} is not "
                           "in the Hugging Face cache") from None
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnmergeError(f"{what} {ref}: the Hub refused the download: {first}") from None
    # the cache names a snapshot by the commit hash a refs/<branch> file holds (read as it is, offline):
    # anything but <cache>/…/snapshots/<40 hex> would be a folder the cache does not own
    if folder.parent.name != "snapshots" or not COMMIT_HASH.fullmatch(folder.name):
        held = str(folder).rsplit(os.sep + "snapshots" + os.sep, 1)[-1]
        raise UnmergeError(f"{what} {ref}: the Hugging Face cache's refs/{ref.revision or 'main'} of {ref.repo_id} "
                           f"holds {short_repr(held)}, not a commit hash (40 hex characters); the cache is "
                           "damaged: delete that refs file and fetch again")
    return folder
