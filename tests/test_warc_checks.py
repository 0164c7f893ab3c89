"""The WARC reader checks each record: WARC-Block-Digest / WARC-Payload-Digest (sha1, base32) against the bytes read,
the WARC Content-Length against where the next record begins, and the HTTP Content-Length against the payload. A bad
record is dropped with one warning naming the file and the record, and counted in `corrupt_records`; warcio's own
stderr dump is not shown."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from loguru import logger

from pipeline.webtext.filters import TolerantWarcReader

PAGE = b"<html><body><p>The river city trades copper and salt.</p></body></html>"


def warc(http_lengths: dict[int, int] | None = None, gzip: bool = False) -> tuple[bytes, list[int], list[str]]:
    """Three HTML responses written by warcio (with its digests); (bytes, record offsets, record ids)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buffer, starts, ids = io.BytesIO(), [], []
    writer = WARCWriter(buffer, gzip=gzip)
    for i in range(3):
        length = (http_lengths or {}).get(i, len(PAGE))
        headers = StatusAndHeaders(
            "200 OK", [("Content-Type", "text/html"), ("Content-Length", str(length))], protocol="HTTP/1.1"
        )
        record = writer.create_warc_record(
            f"https://x.example/{i}", "response", payload=io.BytesIO(PAGE), http_headers=headers, length=None
        )
        ids.append(record.rec_headers.get_header("WARC-Record-ID"))
        starts.append(buffer.tell())
        writer.write_record(record)
    return buffer.getvalue(), starts, ids


def read(tmp_path: Path, data: bytes) -> tuple[list[str], int, list[str]]:
    """(urls read, corrupt_records, warnings) of a WARC file holding `data`."""
    (tmp_path / "a.warc").write_bytes(data)
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        reader = TolerantWarcReader(str(tmp_path))
        urls = [doc.metadata["url"] for doc in reader.run()]
    finally:
        logger.remove(sink)
    return urls, reader.stats["corrupt_records"].total, warnings


def without_digests(data: bytes) -> bytes:
    return re.sub(rb"WARC-(Block|Payload)-Digest: [^\r]*\r\n", b"", data)


def shorten_content_length(data: bytes, start: int, by: int) -> bytes:
    head_end = data.index(b"\r\n\r\n", start)
    match = re.compile(rb"Content-Length: (\d+)").search(data, start, head_end)
    new = str(int(match.group(1)) - by).encode().rjust(len(match.group(1)), b"0")
    return data[: match.start(1)] + new + data[match.end(1) :]


def test_intact_records_are_all_read(tmp_path, capfd):
    data, _, _ = warc()
    assert read(tmp_path, data)[:2] == (["https://x.example/0", "https://x.example/1", "https://x.example/2"], 0)


def test_a_flipped_payload_byte_fails_the_digest(tmp_path):
    data, starts, ids = warc()
    at = data.index(b"copper", starts[1])
    data = data[:at] + b"C" + data[at + 1 :]  # same length: only the digests can tell
    urls, corrupt, warnings = read(tmp_path, data)
    assert (urls, corrupt) == (["https://x.example/0", "https://x.example/2"], 1)
    assert len(warnings) == 1 and ids[1] in warnings[0] and "a.warc" in warnings[0] and "digest" in warnings[0]


@pytest.mark.parametrize("digests", [True, False], ids=["with-digests", "no-digests"])
def test_a_short_warc_content_length_drops_the_record(tmp_path, capfd, digests):
    data, _, ids = warc()
    if not digests:
        data = without_digests(data)
    starts = [m.start() for m in re.finditer(rb"WARC/1\.", data)]
    data = shorten_content_length(data, starts[1], by=7)
    urls, corrupt, warnings = read(tmp_path, data)
    assert (urls, corrupt) == (["https://x.example/0", "https://x.example/2"], 1)
    assert len(warnings) == 1 and ids[1] in warnings[0] and "a.warc" in warnings[0], warnings
    assert capfd.readouterr().err == ""  # warcio's own multi-line dump is not shown


def test_a_wrong_http_content_length_drops_the_record(tmp_path):
    data, _, ids = warc(http_lengths={0: len(PAGE) + 40})
    urls, corrupt, warnings = read(tmp_path, data)
    assert (urls, corrupt) == (["https://x.example/1", "https://x.example/2"], 1)
    assert len(warnings) == 1 and ids[0] in warnings[0] and f"HTTP Content-Length {len(PAGE) + 40}" in warnings[0]
