"""Prompt sources, the train/held-out split, chat rendering (and its cut to a token budget, as the
local path and a server both see it), and JSONL shards.

Reads prompts from a JSONL file (one `{"prompt": ...}` per line, column configurable), an hh-rlhf
transcript file (.jsonl or .jsonl.gz, rows `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}`; the
first Human turn is the prompt), or a `datasets` folder/name. Writes JSONL shards atomically
(temporary name, then rename) for the generation stages.

    python -c "from cai_lite.data import read_prompts; print(read_prompts('tests/fixtures/hh-rlhf-harmless-base.sample.jsonl.gz')[:2])"
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cai_lite import downloads
from cai_lite.config import Config

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Unusable prompt data; the message names the file, line and column."""


@dataclass(frozen=True)
class Prompt:
    id: str  # stable across runs: the row's position in the source
    text: str


@dataclass
class PromptSplit:
    train: list[Prompt]
    held_out: list[Prompt]
    truncated: int  # prompts cut to the character budget
    duplicates: int  # repeated prompt texts dropped (so train and held-out never share a text)


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    n = 0
    try:
        with _open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object per line")
                yield n, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_undecodable_line(path)}: not UTF-8 text ({e.reason})") from None
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a truncated .gz ends in EOFError
        raise DataError(f"{path}: near line {n + 1}: cannot read it ({type(e).__name__}: {e or 'truncated'}); "
                        "is it a complete file?") from None


def _undecodable_line(path: Path) -> int | str:
    """The first line that is not UTF-8 (text mode decodes whole chunks, so its error has no line)."""
    n = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return n
    except (EOFError, OSError, zlib.error):  # a truncated .gz: the bad bytes are near where it ends
        return f"near line {n + 1}"
    return "?"


def _text(value: str, path: Path, n: int) -> str:
    """A prompt text that can be tokenized and written back: JSON escapes can smuggle in lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{path}:{n}: the text holds an unpaired surrogate (an escape like \\ud800), "
                        "which is not valid Unicode") from None
    return value


def first_human_turn(transcript: str) -> str:
    """'\\n\\nHuman: hi\\n\\nAssistant: ...' -> 'hi'."""
    head = transcript.split("\n\nAssistant:", 1)[0]
    return head.split("Human:", 1)[-1].strip()


def read_prompts(source: str, fmt: str = "auto", column: str = "prompt", split: str = "train") -> list[Prompt]:
    """Every prompt of `source`, in file order."""
    path = Path(source)
    if fmt == "datasets" or (fmt == "auto" and (path.is_dir() or not path.exists())):
        return _read_datasets(source, column, split)
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    out = []
    for n, row in _jsonl_rows(path):
        is_hh = fmt == "hh-rlhf" or (fmt == "auto" and column not in row and isinstance(row.get("chosen"), str))
        if is_hh:
            if not isinstance(row.get("chosen"), str) or "Human:" not in row["chosen"]:
                raise DataError(f"{path}:{n}: expected an hh-rlhf row with a 'chosen' transcript")
            text = _text(first_human_turn(row["chosen"]), path, n)
        else:
            if not isinstance(row.get(column), str):
                raise DataError(f"{path}:{n}: no string column {column!r} (set data.column, or data.format=hh-rlhf)")
            text = _text(row[column], path, n)
        if text.strip():
            out.append(Prompt(f"{path.stem.split('.')[0]}-{n:06d}", text))
    if not out:
        raise DataError(f"{path}: no prompts found")
    return out


def _read_datasets(source: str, column: str, split: str) -> list[Prompt]:
    import datasets

    try:
        if Path(source, "dataset_info.json").is_file() or Path(source, "state.json").is_file():
            ds = datasets.load_from_disk(source)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"{source}: cannot load as a file or a datasets source ({type(e).__name__}: {e})") from None
    if column not in ds.column_names:
        raise DataError(f"{source}: no column {column!r} (columns: {ds.column_names}); set data.column")
    return [Prompt(f"{Path(source).name}-{i:06d}", t) for i, t in enumerate(ds[column]) if isinstance(t, str) and t.strip()]


def split_prompts(prompts: list[Prompt], limit: int, held_out: int, shuffle: bool, seed: int,
                  max_chars: int) -> PromptSplit:
    """Dedupe, shuffle (seeded), hold out the last `held_out`, keep the first `limit` of the rest."""
    seen, unique = set(), []
    for p in prompts:
        if p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    if shuffle:
        random.Random(seed).shuffle(unique)
    truncated = 0
    cut = []
    for p in unique:
        if len(p.text) > max_chars:
            truncated += 1
            p = Prompt(p.id, p.text[:max_chars])
        cut.append(p)
    held = cut[len(cut) - held_out:] if held_out else []
    train = cut[: len(cut) - held_out] if held_out else cut
    if limit:
        train = train[:limit]
    return PromptSplit(train, held, truncated, len(prompts) - len(unique))


def prompt_split(cfg: Config) -> PromptSplit:
    """The run's red-team prompts, split as `data.*` says. Every stage gets the same split."""
    d = cfg.data
    s = split_prompts(read_prompts(d.prompts, d.format, d.column, d.split), d.limit, d.eval_prompts, d.shuffle, d.seed,
                      d.max_prompt_chars)
    if s.truncated:
        log.info("%d prompts truncated to %d characters (data.max_prompt_chars)", s.truncated, d.max_prompt_chars)
    return s


def check_source(key: str, source: str, fmt: str = "auto", column: str = "prompt") -> list[str]:
    """Problems with a prompt source, found before any model loads (the file is parsed once here)."""
    if not source or fmt == "datasets" or Path(source).is_dir():
        return []  # datasets sources are resolved by `datasets` itself when the stage runs
    if not Path(source).is_file():
        return [downloads.missing(key, source, otherwise="for a datasets name, set data.format=datasets")]
    try:
        read_prompts(source, fmt, column)
    except DataError as e:
        return [f"{key}: {e}"]
    return []


def read_optional(source: str, limit: int, max_chars: int) -> list[Prompt]:
    """A plain prompt list (helpful prompts): no shuffle, first `limit`."""
    if not source:
        return []
    prompts = read_prompts(source)
    return [Prompt(p.id, p.text[:max_chars]) for p in (prompts[:limit] if limit else prompts)]


# ---- chat rendering -------------------------------------------------------------------------

def render(tokenizer, messages: list[dict], prefill: str = "") -> str:
    """Messages through the tokenizer's own chat template, ending in an open assistant turn that
    starts with `prefill`."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


def adds_bos(tokenizer) -> bool:
    """The tokenizer puts a BOS before any text itself (Llama-2/3, Mistral), as a server holding the
    model (llama.cpp's add_bos_token, vLLM) does before every prompt it tokenizes."""
    return tokenizer.bos_token is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def server_text(tokenizer, text: str) -> str:
    """A rendered prompt as a server that tokenizes it with the model's special tokens must receive
    it: where the server adds a BOS of its own, without the BOS text the chat template wrote, or
    it would see two."""
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) and adds_bos(tokenizer) else text


def decode_for_server(tokenizer, ids: list[int]) -> str:
    """The text a server must receive to tokenize it into `ids`: their decoding, with the BOS text only
    where the server adds no BOS itself (cut_left checks that it tokenizes back). The BOS is decoded
    apart: decoders drop the word-start space of the first piece only at the very start of a text."""
    if ids[:1] != [tokenizer.bos_token_id]:
        return tokenizer.decode(ids, skip_special_tokens=False)
    body = tokenizer.decode(ids[1:], skip_special_tokens=False)
    return body if adds_bos(tokenizer) else tokenizer.bos_token + body


CUT_SEARCH = 16  # tokens cut_left may drop beyond the budget to find a start that tokenizes back the same


def cut_left(tokenizer, ids: list[int], max_tokens: int) -> list[int]:
    """`ids` cut from the left to at most `max_tokens` (the question at the end survives): the BOS,
    if `ids` starts with one (models see it at position 0 in training), then the last tokens, from
    the first start whose text tokenizes back to the same ids. A server given the text
    (generation_http) then holds exactly the tokens the local path does; re-tokenizing a cut made
    mid-word would not (SentencePiece writes a word-start piece "▁" before it). `ids` that fit are
    returned as they are."""
    if len(ids) <= max_tokens:
        return ids
    head = ids[:1] if max_tokens > 1 and ids[0] == tokenizer.bos_token_id else []
    first = len(ids) - max_tokens + len(head)
    for start in range(first, min(first + CUT_SEARCH, len(ids))):
        kept = head + ids[start:]
        if tokenizer(decode_for_server(tokenizer, kept), add_special_tokens=True)["input_ids"] == kept:
            return kept
    return head + ids[first:]  # no start nearby tokenizes back: generation_http's count check will say so


def conversation_text(prompt: str, response: str | None = None) -> str:
    """The plain transcript judges read: 'Human: ...\\n\\nAssistant: ...'."""
    return "Human: " + prompt + ("" if response is None else "\n\nAssistant: " + response)


# ---- shards ---------------------------------------------------------------------------------

def shard_path(out: Path, index: int) -> Path:
    return out / f"part-{index:05d}.jsonl"


def write_shard_pair(out: Path, index: int, rows: list[dict], failed: list[dict]) -> None:
    """A shard of usable rows (`part-N.jsonl`, what trainers read) and the rows set aside from it
    (`failed-N.jsonl`: no valid revision, or no label), kept for reading and counting. The failed
    file goes first: the part file's presence is what marks the shard done."""
    aside = out / f"failed-{index:05d}.jsonl"
    if failed:
        write_shard(aside, failed)
    else:
        aside.unlink(missing_ok=True)  # from an interrupted earlier attempt at this shard
    write_shard(shard_path(out, index), rows)


def read_failed(folder: Path) -> list[dict]:
    """The rows `write_shard_pair` set aside, for every shard that is done."""
    rows = []
    for p in sorted(folder.glob("failed-*.jsonl")):
        if shard_path(folder, int(p.stem.split("-")[1])).is_file():
            rows += [r for _, r in _jsonl_rows(p)]
    return rows


def write_shard(path: Path, rows: list[dict]) -> None:
    """Write rows to `path` atomically: a crash leaves either the whole shard or none."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_shards(folder: Path) -> list[dict]:
    rows = []
    for p in sorted(folder.glob("part-*.jsonl")):
        rows += [r for _, r in _jsonl_rows(p)]
    return rows


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
