"""An input file's documents, read part by part: what prepare's worker processes read on their own.

Every input file is cut into parts (jsonl byte ranges of whole lines, parquet row groups, text files' byte ranges
cut where the tokens stay the same, Tiny Shakespeare's two character ranges); a part names a slice of a file, so
only its small description goes to a worker, and the cut depends on the file alone (never on the worker count).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, first_line
from .files import cannot
from .sources import Unit


@dataclass(frozen=True)
class Part:
    """A slice of one input file that a worker reads and tokenizes on its own."""

    path: str
    kind: str  # txt | paragraphs | jsonl | parquet | chars
    start: int = 0  # jsonl: byte offset; parquet: row group; chars: character offset
    stop: int = 0
    field: str = "text"
    split: str | None = None  # forced split (shakespeare); None: shard 0 is val, the rest train
    continues: bool = False  # its first document goes on from the part before (a .txt's): no EOT before it


def plan_parts(unit: Unit, path: Path, part_bytes: int) -> list[Part]:
    """Cut one input file into parts; depends only on the file (never on the worker count)."""
    p = str(path)
    if unit.kind == "jsonl":
        bounds = _line_bounds(path, part_bytes)
        return [Part(p, "jsonl", a, b, unit.field) for a, b in zip(bounds, bounds[1:])]
    if unit.kind == "parquet":
        return [Part(p, "parquet", i, i + 1, unit.field) for i in range(_row_groups(path, unit.field))]
    if unit.kind == "shakespeare":
        # the last 10% is val (first, as shard 0), as nanoGPT cuts it; each split is one document, led by the EOT
        # that every document gets (as in fineweb.py): one token more per split than nanoGPT's prepare.py writes
        n = len(_read_text(path))
        cut = int(n * 0.9)
        return [Part(p, "chars", cut, n, split="val"), Part(p, "chars", 0, cut, split="train")]
    bounds = _text_bounds(path, part_bytes, _TEXT_CUTS[unit.kind])  # txt, paragraphs
    return [Part(p, unit.kind, a, b, continues=unit.kind == "txt" and a > 0) for a, b in zip(bounds, bounds[1:])]


# Where a text file's byte ranges may start, that its tokens stay what the whole file's are: a .txt (one document)
# before the space of an ASCII "letter space letter", where GPT-2's pre-tokenizer splits in any case (" word" is one
# piece, and nothing before it reaches past its space); split on blank lines, after the last newline of a blank line
# that ASCII text follows, where a document ends. Not found (a text without them), the file stays one part.
_TEXT_CUTS = {"txt": re.compile(rb"(?<=[A-Za-z])(?= [A-Za-z])"),
              # (the run's last two newlines: `\n\s*\n` backtracked through a run of blank lines, quadratic in it)
              "paragraphs": re.compile(rb"\n[ \t\r\f\v]*\n(?=[ \t\r\f\v]*[\x21-\x7e])")}
_WINDOW = 1 << 16  # bytes searched at a time for a cut


def _text_bounds(path: Path, part_bytes: int, cut: re.Pattern) -> list[int]:
    """Byte offsets that cut a text file into ranges of about `part_bytes` each, at the first `cut` after each."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            bounds = [0]
            at = part_bytes
            while at < size:
                f.seek(at)
                found = cut.search(f.read(_WINDOW + 64))  # (a cut whose context crosses the window's end is missed)
                if found:
                    bounds.append(at + found.end())
                    at = bounds[-1] + part_bytes
                else:
                    at += _WINDOW
    except OSError as e:
        raise cannot("read", path, e) from None
    return bounds + [size] if bounds[-1] < size else bounds


def _line_bounds(path: Path, part_bytes: int) -> list[int]:
    """Byte offsets that cut a file into ranges of whole lines, about `part_bytes` each."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            bounds = [0]
            for target in range(part_bytes, size, part_bytes):
                if target > bounds[-1]:
                    f.seek(target)
                    f.readline()
                    bounds.append(f.tell())
    except OSError as e:
        raise cannot("read", path, e) from None
    return bounds + [size] if bounds[-1] < size else bounds


def _row_groups(path: Path, field: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path}: cannot read parquet ({first_line(e)})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{path}: no column {field!r} (columns: {', '.join(names)}); choose one with --text-field")
    return pf.num_row_groups


def _read_text(path: str | Path, start: int = 0, stop: int | None = None) -> str:
    """The text of bytes [start, stop) of a file (to its end where stop is None)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if stop is None else f.read(stop - start)
        # a BOM (as some Windows editors write) is no text: it was 3 tokens, where a .jsonl's is skipped
        return data.decode("utf-8").removeprefix("\ufeff" if start == 0 else "")
    except OSError as e:
        raise cannot("read", path, e) from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {start + e.start})") from None


def read_docs(part: Part) -> list[str]:
    """The non-empty documents of one part, in file order."""
    if part.kind == "jsonl":
        return _jsonl_docs(part)
    if part.kind == "parquet":
        return _parquet_docs(part)
    if part.kind == "chars":  # (character offsets)
        text = _read_text(part.path)[part.start : part.stop]
    else:  # txt, paragraphs: byte offsets
        text = _read_text(part.path, part.start, part.stop)
    if part.kind == "paragraphs":
        docs = [p.strip("\r\n") for p in re.split(r"\n\s*\n", text)]
    else:
        docs = [text]
    return [d for d in docs if _keep(d)]


def _keep(text: str | None) -> bool:
    """Empty and whitespace-only documents are skipped."""
    return bool(text) and not text.isspace()


def _jsonl_docs(part: Part) -> list[str]:
    try:
        with open(part.path, "rb") as f:
            f.seek(part.start)
            data = f.read(part.stop - part.start)
    except OSError as e:
        raise cannot("read", part.path, e) from None
    lines = data.split(b"\n")
    try:
        texts = data.decode().split("\n")
    except UnicodeDecodeError:
        texts = [None] * len(lines)  # json.loads names the line that is not UTF-8
    docs = []
    for i, (line, line_text) in enumerate(zip(lines, texts)):
        if not line.strip():
            continue
        record = _parse_line(part, i, line, line_text)
        if not isinstance(record, dict) or part.field not in record:
            raise UserError(f"{part.path}, line {_line_no(part, i)}: no text field {part.field!r} "
                            "(choose the field with --text-field)")
        text = record[part.field]
        if not isinstance(text, (str, type(None))):
            raise UserError(f"{part.path}, line {_line_no(part, i)}: field {part.field!r} holds "
                            f"{type(text).__name__}, not text")
        if _keep(text):
            docs.append(text)
    return docs


_scan = json.JSONDecoder().scan_once  # one value from a position: quicker per line than json.loads


def _parse_line(part: Part, i: int, line: bytes, text: str | None = None):
    """The one JSON value of line `i` (`text`: the line decoded). Each line is parsed by itself: the part's lines
    parsed as one array took `{...},{...}` on one line, with a value cut over the next two, for three records."""
    if text is not None:
        text = text.strip(" \t\r")
        try:
            value, end = _scan(text, 0)
            if end == len(text):
                return value
        except (StopIteration, ValueError, RecursionError):
            pass  # json.loads says what is wrong (or takes a line that starts with a BOM)
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nested too deeply
        raise UserError(f"{part.path}, line {_line_no(part, i)}: not valid JSON ({first_line(e)})") from None


def _line_no(part: Part, i: int) -> int:
    """1-based line number of line `i` of a jsonl part (only computed for error messages)."""
    with open(part.path, "rb") as f:
        return f.read(part.start).count(b"\n") + i + 1


def _parquet_docs(part: Part) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        column = pq.ParquetFile(part.path).read_row_group(part.start, columns=[part.field]).column(0)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{part.path}: cannot read parquet ({first_line(e)})") from None
    # strings, dictionary-encoded too (as pandas writes a category); named, as pyarrow before 16 has no string_view
    value_type = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if str(value_type) not in ("string", "large_string", "string_view"):
        raise UserError(f"{part.path}: column {part.field!r} holds {column.type}, not text")
    try:
        return [t for t in column.to_pylist() if _keep(t)]
    except UnicodeDecodeError as e:  # a writer other than Arrow may store any bytes in a string column
        raise UserError(f"{part.path}: column {part.field!r} is not UTF-8 text ({e.reason})") from None
