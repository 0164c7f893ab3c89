"""Offline-safe datatrove steps around the library's own filters, used by the web-text stage (passes.py).

datatrove's defaults reach for the network or for packages we do not ship: its WARC reader needs cchardet and
libmagic bindings and loses the rest of a file at the first corrupt record, its English word tokenizer is spaCy's,
its language filter downloads the fastText model and its C4 bad-words filter downloads the word list. The steps here
replace exactly those pieces; everything else (Trafilatura, Gopher, C4, exact and MinHash dedup) is datatrove's.

Every class is a module-level datatrove `PipelineStep`, so the Slurm and Ray executors can pickle the pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import regex
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.language_filter import LanguageFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.lid import FastTextLID
from datatrove.utils.logging import logger
from datatrove.utils.word_tokenizers import WhitespaceTokenizer, strip_strings

from pipeline.webtext.stopwords import STOP_WORDS

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
DEFAULT_BAD_WORDS = RESOURCES / "bad_words_en.txt"

_WORD_RE = regex.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]+")
_LOWER_WORD_RE = regex.compile(r"\p{L}+(?:['’]\p{L}+)*")


def count_tokens(text: str) -> int:
    """What stats.json calls a token: one whitespace-separated word."""
    return len(text.split())


class SimpleWordTokenizer(WhitespaceTokenizer):
    """datatrove's fallback tokenizer with a regex word splitter in place of spaCy (which is not a dependency here).

    Words are runs of letters/digits (with inner apostrophes or hyphens); punctuation runs are separate tokens, as
    spaCy would split them. Sentences come from datatrove's terminal-punctuation regex. Passed as `language=` to
    datatrove's Gopher, C4 and MinHash steps (their `load_word_tokenizer` accepts a tokenizer instance).
    """

    def word_tokenize(self, text: str) -> list[str]:
        return strip_strings(_WORD_RE.findall(text))


# --------------------------------------------------------------------------------------------------------------
# Reading


_GZIP_MAGIC = b"\x1f\x8b\x08"
_HTML_TYPES = ("text/html", "application/xhtml+xml")


class TolerantWarcReader(BaseDiskReader):
    """WARC/WET reader that skips a corrupt record, counts it (`corrupt_records`) and reads on from the next record.

    Records are found again after damage by scanning for the next gzip member (per-record gzip, as Common Crawl
    writes) or the next `WARC/1.x` line (uncompressed files). Response records with an HTML payload and WET
    `conversion` records become documents (id = WARC-Record-ID, metadata url and date); other records are ignored.
    Unlike datatrove's `WarcReader` it needs neither cchardet nor libmagic: the charset comes from the HTTP header,
    with UTF-8 as the default.
    """

    name = "🕷 Warc (skips corrupt records)"
    _requires_dependencies = ["warcio"]

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rb") as f:
            gzipped = f.read(3) == _GZIP_MAGIC
            offset: int | None = 0
            while offset is not None:
                offset = yield from self._read_from(f, filepath, offset, gzipped)

    def _read_from(self, f: IO[bytes], filepath: str, start: int, gzipped: bool) -> Iterator[Document]:
        """Yield documents from `start` on; return where to resume after a corrupt record (None at the end).

        A record's document is held back until the next record begins where the record's WARC Content-Length
        says: a record whose length is short (the rest of its block is where the next record should be) is dropped.
        """
        f.seek(start)
        records = _checked_archive_iterator()(f, check_digests=True)
        pending: tuple[Document, str] | None = None  # (document, record id) until the boundary after it is checked
        while True:
            records.misaligned = False
            try:
                record = next(records)
                data = _record_to_dict(record)
                problem = _record_problem(record) if isinstance(data, dict) else None
            except StopIteration:
                yield from self._settle(pending, records.misaligned, filepath)
                return None
            except (
                Exception
            ) as exc:  # warcio and zlib raise many types on damaged input; the record is lost either way
                tail_of_short_record = pending is not None and records.misaligned
                yield from self._settle(pending, records.misaligned, filepath)
                failed_at = records.offset
                resume = _find_next_record(f, failed_at + 1, gzipped)
                if not tail_of_short_record:  # else the failure is the dropped record's own tail, counted once
                    self.stat_update("corrupt_records")
                    after = f"reading on at byte {resume}" if resume is not None else "no intact record follows"
                    logger.warning(
                        f"skipped a corrupt WARC record in {filepath} at byte {failed_at} "
                        f"({type(exc).__name__}: {str(exc)[:60]!r}); {after}"
                    )
                return resume
            yield from self._settle(pending, records.misaligned, filepath)
            pending = None
            if data is None:
                continue
            if data == "non_html":
                self.stat_update("non_html_responses")
                continue
            if problem is not None:
                self.stat_update("corrupt_records")
                logger.warning(f"dropped WARC record {data['id']} in {filepath}: {problem}")
                continue
            document = self.get_document_from_dict(data, filepath, records.offset)
            if document:
                pending = (document, document.id)

    def _settle(self, pending: tuple[Document, str] | None, misaligned: bool, filepath: str) -> Iterator[Document]:
        """Pass the held-back document on, or drop it (one warning, counted) when its record's length was short."""
        if pending is None:
            return
        if misaligned:
            self.stat_update("corrupt_records")
            logger.warning(
                f"dropped WARC record {pending[1]} in {filepath}: its WARC Content-Length is shorter than its block "
                "(the next record does not begin where it ends)"
            )
            return
        yield pending[0]


@functools.cache
def _checked_archive_iterator() -> type:
    """warcio's ArchiveIterator, with a record whose WARC Content-Length is wrong noted (`misaligned`) instead of
    warcio's multi-line stderr dump (which names neither the file nor the record)."""
    from warcio.archiveiterator import ArchiveIterator

    class CheckedArchiveIterator(ArchiveIterator):
        misaligned = False

        def _consume_blanklines(self) -> tuple[bytes | None, int]:
            empty_size, first_line = 0, True
            while True:
                line = self.reader.readline()
                if len(line) == 0:
                    return None, empty_size
                if len(line.rstrip()) == 0 or first_line:
                    empty_size += len(line)
                    if len(line.rstrip()) != 0:  # the previous record's block went on past its Content-Length
                        self.misaligned = True
                        self.err_count += 1
                    first_line = False
                    continue
                return line, empty_size

    return CheckedArchiveIterator


def _record_problem(record: Any) -> str | None:
    """What is wrong with a fully read record: a WARC-Block-Digest or WARC-Payload-Digest (sha1, base32) that does not
    match the bytes read, or an HTTP Content-Length other than the payload's length; None when it checks out."""
    checker = record.digest_checker
    if checker is not None and checker.passed is False:
        return "; ".join(checker.problems) or "digest mismatch"
    headers = record.http_headers
    if headers is not None and not headers.get_header("Transfer-Encoding"):
        declared = headers.get_header("Content-Length")
        if declared is not None and declared.strip().isdigit() and record.payload_length >= 0:
            if int(declared) != record.payload_length:
                return f"HTTP Content-Length {int(declared)} but the payload holds {record.payload_length} bytes"
    return None


def _record_to_dict(record: Any) -> dict | str | None:
    """The document fields of an HTML response or WET conversion record; None for other records."""
    if record.rec_type not in ("response", "conversion"):
        return None
    mime = record.rec_headers.get_header("WARC-Identified-Payload-Type")
    charset = None
    if record.rec_type == "response":
        http_type = record.http_headers.get_header("Content-Type") if record.http_headers else None
        if http_type and "charset=" in http_type.lower():
            charset = http_type.lower().split("charset=", 1)[1].split(";")[0].strip().strip("\"'")
        mime = (mime or http_type or "text/html").split(";")[0].strip().lower()
        if mime not in _HTML_TYPES:
            return "non_html"
    content = record.content_stream().read()
    text = None
    for encoding in ("utf-8", charset):
        if encoding:
            try:
                text = content.decode(encoding)
                break
            except (UnicodeDecodeError, LookupError):
                continue
    if text is None:
        text = content.decode("utf-8", errors="replace")
    return {
        "text": text,
        "id": record.rec_headers.get_header("WARC-Record-ID"),
        "url": record.rec_headers.get_header("WARC-Target-URI"),
        "date": record.rec_headers.get_header("WARC-Date"),
    }


def _find_next_record(f: IO[bytes], pos: int, gzipped: bool, chunk_size: int = 1 << 20) -> int | None:
    """Offset of the first intact-looking record at or after `pos`, or None."""
    marker = _GZIP_MAGIC if gzipped else b"\nWARC/1."
    while True:
        f.seek(pos)
        chunk = f.read(chunk_size + len(marker))
        hit = chunk.find(marker)
        while hit != -1:
            candidate = pos + hit + (0 if gzipped else 1)
            if _looks_like_record(f, candidate, gzipped):
                return candidate
            hit = chunk.find(marker, hit + 1)
        if len(chunk) < chunk_size + len(marker):
            return None
        pos += chunk_size


def _looks_like_record(f: IO[bytes], offset: int, gzipped: bool) -> bool:
    f.seek(offset)
    head = f.read(4096)
    if gzipped:
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 64)
        except zlib.error:
            return False
    return re.match(rb"WARC/1\.[01]\r?\n", head) is not None


class ShardFileReader(JsonlReader):
    """Reads the one intermediate file a rank wrote in an earlier pass (`{rank:05d}.jsonl.gz`), or nothing.

    datatrove's MinHash and exact-dedup steps address documents by (rank, position in that rank's stream), so every
    pass must see exactly what the same rank wrote before, even when other ranks wrote nothing.
    """

    name = "📖 Shard file"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        filename = f"{rank:05d}.jsonl.gz"
        if not self.data_folder.exists(filename):
            return
        for document in self.read_files_shard([filename]):
            self.update_doc_stats(document)
            yield document


class LimitDocuments(PipelineStep):
    """Passes on at most `limit` documents in total: rank r takes limit // tasks (one more for the low ranks)."""

    type = "✂️ - LIMIT"
    name = "✂️ Limit"

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        share = self.limit // world_size + (1 if rank < self.limit % world_size else 0)
        for document in itertools.islice(data, share):
            self.stat_update("documents")
            yield document


class Tally(PipelineStep):
    """Counts the documents and tokens (whitespace words) flowing past this point of the pipeline."""

    type = "🔢 - TALLY"

    def __init__(self, label: str):
        self.label = label
        self.name = f"🔢 {label}"  # before PipelineStep.__init__, which names the step's stats after it
        super().__init__()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for document in data:
            self.stat_update("documents")
            self.stat_update("tokens", value=count_tokens(document.text))
            yield document


# --------------------------------------------------------------------------------------------------------------
# Extraction and filters


class TrafilaturaExtractor(Trafilatura):
    """datatrove's Trafilatura step, with trafilatura imported before its sandbox process forks.

    The sandbox warms up within `timeout` seconds; importing trafilatura in the child takes longer than that on a
    busy machine, and every document would then be dropped as a timeout.
    """

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import trafilatura  # noqa: F401

        yield from super().run(data, rank, world_size)


class StopWordLanguageFilter(BaseFilter):
    """Model-free language test: keeps a document when at least `min_share` of its words are stop words of `language`.

    The listed function words make up a fifth to a half of running English prose and almost none of a text in another
    language, so a low threshold (0.1) separates the two without a model; it tests the language, not the quality
    (short or list-like pages are left to the Gopher and C4 filters). Sets metadata `language` and `language_score`.
    """

    name = "🌍 Language (stop words)"

    def __init__(self, language: str = "en", min_share: float = 0.1, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        if language not in STOP_WORDS:
            raise ValueError(f"no stop-word list for language {language!r} (known: {', '.join(STOP_WORDS)})")
        self.language = language
        self.min_share = min_share

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = _LOWER_WORD_RE.findall(doc.text.lower())
        share = stop_word_share(words, STOP_WORDS[self.language])
        doc.metadata["language"] = self.language
        doc.metadata["language_score"] = round(share, 4)
        if share < self.min_share:
            return False, "too_few_stop_words"
        return True


def stop_word_share(words: list[str], stop_words: frozenset[str]) -> float:
    """Share of `words` that are in `stop_words` (0 for no words)."""
    if not words:
        return 0.0
    return sum(word in stop_words for word in words) / len(words)


class LocalFastTextLID(FastTextLID):
    """fastText language identification from a local model file (datatrove's FT176LID downloads lid.176.bin)."""

    def __init__(self, model_path: str, languages: list[str] | None = None):
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


class FastTextLanguageFilter(LanguageFilter):
    """datatrove's LanguageFilter on a local fastText model (lid.176.bin or GlotLID)."""

    def __init__(
        self,
        model_path: str,
        languages: list[str],
        language_threshold: float = 0.65,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(languages=languages, language_threshold=language_threshold, exclusion_writer=exclusion_writer)
        self.model = LocalFastTextLID(model_path, languages)


def load_bad_words(path: Path | None = None) -> list[str]:
    """Words and phrases of a bad-words file: one per line, lower-cased; blank lines and `#` comments ignored."""
    path = Path(path) if path else DEFAULT_BAD_WORDS
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            words.append(line)
    return words


class BadWordsFilter(BaseFilter):
    """Drops a document containing any word or phrase of the list as a whole word (C4's rule, with our own list)."""

    name = "⛰ Bad words"

    def __init__(self, words: list[str], exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.words = sorted(set(words))
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self.pattern = re.compile(rf"(?:\W|^)({alternatives})(?:\W|$)") if self.words else None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.pattern is not None and self.pattern.search(doc.text.lower()):
            return False, "bad_words"
        return True


# --------------------------------------------------------------------------------------------------------------
# Output


def held_out_rank(doc_id: str, seed: int) -> float:
    """A document's place in [0, 1) for the train/validation split: a hash of (seed, id)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out(doc_id: str, seed: int, share: float) -> bool:
    """Deterministic split: a document is held out when its `held_out_rank` falls in the lowest `share`."""
    return held_out_rank(doc_id, seed) < share


class SplitTagger(PipelineStep):
    """Sets metadata `split` to 'validation' or 'train' by the hash of the document id (see `held_out`)."""

    type = "🔀 - SPLIT"
    name = "🔀 Train/validation split"

    def __init__(self, heldout_share: float, seed: int):
        super().__init__()
        self.heldout_share = heldout_share
        self.seed = seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for document in data:
            split = "validation" if held_out(document.id, self.seed, self.heldout_share) else "train"
            document.metadata["split"] = split
            self.stat_update(split)
            self.stat_update(f"{split}_tokens", value=count_tokens(document.text))
            yield document


def output_row(self: Any, document: Document) -> dict:
    """ParquetWriter adapter: the columns of the web-text stage's output (`text`, `id`, `url`)."""
    return {"text": document.text, "id": str(document.id), "url": document.metadata.get("url") or ""}


def document_text(document: Document) -> str:
    """What exact deduplication hashes: the extracted, filtered text."""
    return document.text
