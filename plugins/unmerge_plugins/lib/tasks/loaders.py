"""Turn a registry task (:class:`unmerge_core.types.TaskInfo`) into lists of :class:`Example`.

Three source kinds, chosen by ``task.source["kind"]``:

``procedural``
    ``generator`` names an entry of :data:`GENERATORS`.
``jsonl``
    ``path`` (absolute by the time it gets here), ``prompt_field`` (default ``prompt``),
    ``response_field`` (default ``response``), optional ``template``, optional ``labels``.
``hf``
    ``dataset`` (a Hugging Face id), optional ``config``, ``split`` (default ``train``),
    ``prompt_field``, ``response_field``, optional ``template``, ``labels`` and ``limit``. Read
    lazily (``streaming=True``): only the first ``limit`` records are fetched, whatever the size of
    the dataset (a local folder of json / parquet files works too).

Field names may be dotted paths into nested records, with integers indexing lists
(``answers.text.0``). ``template`` is a :meth:`str.format` template over the record's fields that
builds the prompt instead of ``prompt_field``. ``labels`` maps an integer response (a class id) to
a name: ``labels = ["negative", "positive"]``.

Train and held-out examples never share a prompt, whatever the seeds and sizes: membership is
decided by a stable hash of the prompt, not by the seed. For procedural tasks about 10% of the
prompt space is held out; for datasets the distinct prompts with the smallest hashes (10%, at
least one) are held out. The seed only decides which examples are drawn and their order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from unmerge_core import TaskInfo, UnmergeError
from unmerge_plugins.lib.tasks.generators import GENERATORS, PRETRAINING_TASKS, Example, Generator

SPLITS: tuple[str, ...] = ("train", "heldout")
SOURCE_KINDS: tuple[str, ...] = ("procedural", "jsonl", "hf")
HELDOUT_FRACTION = 0.1
_BUCKETS = 1000


def _stable_hash(prompt: str) -> int:
    """A 64-bit hash of a prompt that does not depend on ``PYTHONHASHSEED`` or the platform."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "big")


def _is_heldout(prompt: str) -> bool:
    """Whether a procedural prompt belongs to the held-out part of its task's prompt space."""
    return _stable_hash(prompt) % _BUCKETS < int(HELDOUT_FRACTION * _BUCKETS)


def load_examples(task: TaskInfo, n: int, seed: int, split: str = "train") -> list[Example]:
    """Return up to ``n`` examples of ``task`` for ``split`` (``"train"`` or ``"heldout"``).

    Procedural tasks always return exactly ``n`` distinct prompts (their prompt spaces are large);
    dataset tasks return ``min(n, available)``. Deterministic for a given ``(task, n, seed, split)``.
    """
    if split not in SPLITS:
        raise UnmergeError(f"task {task.name}: unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if n < 0:
        raise UnmergeError(f"task {task.name}: number of examples must be >= 0, got {n}")
    kind = task.source.get("kind")
    if kind == "procedural":
        return _procedural(task, n, seed, split)
    if kind == "jsonl":
        examples = _read_jsonl(task)
    elif kind == "hf":
        examples = _read_hf(task)
    else:
        raise UnmergeError(
            f"task {task.name}: unknown source kind {kind!r}; choose one of: {', '.join(SOURCE_KINDS)}"
        )
    return _split_records(task, examples, n, seed, split)


def corpus_for_tokenizer(n_per_task: int = 50, seed: int = 0) -> list[str]:
    """``n_per_task`` texts ``"<prompt>\\n<response>"`` from every pre-training task, in name order."""
    texts: list[str] = []
    for name in sorted(PRETRAINING_TASKS):
        rng = random.Random(f"corpus:{name}:{seed}")
        for _ in range(n_per_task):
            ex = GENERATORS[name](rng)
            texts.append(f"{ex.prompt}\n{ex.response}")
    return texts


# ------------------------------------------------------------------------------------------------
# procedural
# ------------------------------------------------------------------------------------------------


def get_generator(task: TaskInfo) -> Generator:
    """The generator function a procedural task names, or an :class:`UnmergeError`."""
    name = task.source.get("generator")
    if not isinstance(name, str) or name not in GENERATORS:
        raise UnmergeError(
            f"task {task.name}: unknown generator {name!r}; choose one of: {', '.join(sorted(GENERATORS))}"
        )
    return GENERATORS[name]


def _procedural(task: TaskInfo, n: int, seed: int, split: str) -> list[Example]:
    generate = get_generator(task)
    rng = random.Random(f"{task.name}:{split}:{seed}")
    want_heldout = split == "heldout"
    seen: set[str] = set()
    out: list[Example] = []
    attempts, max_attempts = 0, 200 * n + 1000
    while len(out) < n and attempts < max_attempts:
        attempts += 1
        ex = generate(rng)
        if ex.prompt in seen or _is_heldout(ex.prompt) != want_heldout:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    if len(out) < n:
        raise UnmergeError(
            f"task {task.name}: generator {task.source['generator']!r} produced only {len(out)} distinct "
            f"{split} prompts, fewer than the {n} asked for; ask for fewer examples"
        )
    return out


# ------------------------------------------------------------------------------------------------
# records (jsonl and hf)
# ------------------------------------------------------------------------------------------------


def _lookup(record: Mapping[str, Any], path: str) -> Any:
    """Follow a dotted path (``answers.text.0``) through dicts and lists; ``KeyError`` if absent."""
    value: Any = record
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def _as_text(value: Any, field: str, labels: list[str] | None) -> str:
    """A scalar field value as text; integer class ids go through ``labels`` when given."""
    if labels is not None and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(labels):
            raise ValueError(f"field '{field}' is {value}, outside labels (0..{len(labels) - 1})")
        return labels[value]
    if isinstance(value, (list, tuple, dict)):
        kind = type(value).__name__
        raise ValueError(f"field '{field}' is a {kind}; use a dotted path such as '{field}.0'")
    return str(value)


def _to_example(source: Mapping[str, Any], record: Any) -> Example:
    """Build one example; raises ``ValueError`` with a short reason naming the field."""
    if not isinstance(record, Mapping):
        raise ValueError(f"record is a {type(record).__name__}, not an object")
    labels = source.get("labels")
    template = source.get("template")
    if template is not None:
        try:
            prompt = str(template).format(**record)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"template field {exc} is missing") from None
    else:
        field = source.get("prompt_field", "prompt")
        try:
            prompt = _as_text(_lookup(record, field), field, None)
        except KeyError:
            raise ValueError(f"missing field '{field}'") from None
    field = source.get("response_field", "response")
    try:
        response = _as_text(_lookup(record, field), field, labels)
    except KeyError:
        raise ValueError(f"missing field '{field}'") from None
    return Example(prompt, response)


def _read_jsonl(task: TaskInfo) -> list[Example]:
    path = Path(str(task.source.get("path", "")))
    if not path.is_file():
        raise UnmergeError(f"task {task.name}: jsonl file {path} does not exist")
    out: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(_to_example(task.source, json.loads(line)))
            except json.JSONDecodeError as exc:
                msg = f"invalid JSON ({exc.msg})"
                raise UnmergeError(f"task {task.name}: {path}:{lineno}: {msg}") from None
            except ValueError as exc:
                raise UnmergeError(f"task {task.name}: {path}:{lineno}: {exc}") from None
    return out


def _read_hf(task: TaskInfo) -> list[Example]:
    """The first ``limit`` records of the split (all of them without a ``limit``), streamed: the dataset
    is read lazily, record by record, and never downloaded or converted whole."""
    src = task.source
    dataset = src.get("dataset")
    if not dataset:
        raise UnmergeError(f"task {task.name}: source kind 'hf' needs a 'dataset' (a Hugging Face id)")
    limit = src.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UnmergeError(f"task {task.name}: source 'limit' must be a positive integer (records read), "
                           f"got {limit!r}")
    split = src.get("split", "train")

    def unreadable(exc: BaseException) -> UnmergeError:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return UnmergeError(f"task {task.name}: could not load Hugging Face dataset {dataset}: {reason}; "
                            "on an offline machine use a jsonl source")

    try:
        import datasets

        data: Iterable[Any] = datasets.load_dataset(dataset, src.get("config"), split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported in one line
        raise unreadable(exc) from None
    out: list[Example] = []
    records = iter(data)
    for i in range(limit) if limit is not None else itertools.count():
        try:
            record = next(records)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - a stream fails while it is read, not when it is opened
            raise unreadable(exc) from None
        try:
            out.append(_to_example(src, record))
        except ValueError as exc:
            where = f"Hugging Face dataset {dataset}, split {split}, record {i}"
            raise UnmergeError(f"task {task.name}: {where}: {exc}") from None
    return out


def _split_records(task: TaskInfo, examples: list[Example], n: int, seed: int, split: str) -> list[Example]:
    """Dedupe by prompt, hold out the smallest-hash 10% (at least one), shuffle the part asked for."""
    unique: dict[str, Example] = {}
    for ex in examples:
        if ex.prompt.strip() and ex.response.strip():
            unique.setdefault(ex.prompt, ex)
    if len(unique) < 2:
        raise UnmergeError(
            f"task {task.name}: needs at least 2 examples with distinct prompts to hold one out, "
            f"found {len(unique)}"
        )
    ranked = sorted(unique.values(), key=lambda ex: (_stable_hash(ex.prompt), ex.prompt))
    n_held = max(1, int(len(ranked) * HELDOUT_FRACTION))
    part = ranked[:n_held] if split == "heldout" else ranked[n_held:]
    random.Random(f"{task.name}:{split}:{seed}").shuffle(part)
    return part[:n]
