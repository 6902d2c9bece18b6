"""UTF-8 helpers every tokenizer needs: text to bytes, bytes to code points, bad bytes to U+FFFD.

    utf8_bytes(text)     the bytes of any str, lone surrogates included (as run.c reads argv)
    utf8_chunks(data)    bytes split into code points, the way run.c's encode() splits them
    UTF8_ERRORS          a codecs error handler: one U+FFFD per invalid byte, as SentencePiece
"""
import codecs


def _replace_each_byte(err):
    """UTF-8 decode error handler: one U+FFFD per invalid byte, the way SentencePiece decodes.

    Python's errors="replace" gives one U+FFFD per *run* of bad bytes, so b"\\xe3\\x81" would become
    "\\ufffd" where SentencePiece (and so Meta's decode) gives "\\ufffd\\ufffd".
    """
    return "\ufffd" * (err.end - err.start), err.end


UTF8_ERRORS = "minillama.replace-each-byte"
codecs.register_error(UTF8_ERRORS, _replace_each_byte)


def utf8_bytes(text):
    """`text` as UTF-8 bytes, whatever it holds. Bytes that were not UTF-8 where the text came
    from (a command-line argument, a file name) arrive as U+DC80..U+DCFF (Python's
    surrogateescape) and become those bytes again, as run.c would read them from argv; any other
    lone surrogate is written as its own 3 bytes (surrogatepass)."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass")


def utf8_chunks(data):
    """Split UTF-8 bytes into code points, the way run.c does: a chunk starts at any byte that is
    not a continuation byte (0b10xxxxxx) and takes the continuation bytes after it, 4 bytes at most."""
    chunks, start = [], 0
    while start < len(data):
        end = start + 1
        while end < len(data) and data[end] & 0xC0 == 0x80 and end - start < 4:
            end += 1
        chunks.append(data[start:end])
        start = end
    return chunks
