"""Streaming decode: token ids in, finished text out, one token at a time."""
import codecs

from .utf8 import UTF8_ERRORS


class StreamDecoder:
    """Decode ids one at a time for streaming output: feed(id) returns the text now complete.

    A character outside the vocabulary arrives as several byte tokens (e.g. "あ" is <0xE3> <0x81>
    <0x82>); its bytes wait here until the character is whole. Invalid bytes become U+FFFD, one
    per byte, so nothing is dropped and nothing raises. The pieces fed, joined with flush(), equal
    tokenizer.decode(ids) (for the SentencePiece tokenizer too: tests compare them).

    at_start=True: the first piece starts the text and loses its leading space (as in decode()).
    Pass at_start=False to continue text already shown, e.g. the tokens generated after a prompt.
    """

    def __init__(self, tokenizer, at_start=True):
        self.tokenizer = tokenizer
        self.at_start = at_start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=UTF8_ERRORS)

    def feed(self, token):
        token = self.tokenizer.check_id(token)
        if self.tokenizer.is_control(token):
            # BOS/EOS print nothing, and a character cannot span them: SentencePiece decodes each
            # unbroken run of byte tokens on its own, so bytes left unfinished are bad bytes now.
            return self.flush()
        data = self.tokenizer.text_bytes(token, self.at_start)
        if data or not self.tokenizer.drops_all_leading_spaces:
            self.at_start = False
        return self._utf8.decode(data)

    def flush(self):
        """The text still held back (an unfinished character comes out as U+FFFDs)."""
        return self._utf8.decode(b"", final=True)
