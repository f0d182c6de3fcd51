"""Mixtral's tokenizer: sentencepiece, with text streamed as it becomes final (mixtral.Tokenizer)."""

from pathlib import Path
from typing import Iterable, Iterator, List

from runtime import MixtralError


class Tokenizer:
    def __init__(self, model_path: str):
        from sentencepiece import SentencePieceProcessor

        if not Path(model_path).is_file():
            raise MixtralError(f"{model_path}: tokenizer file not found")
        try:
            self._sp = SentencePieceProcessor(model_file=str(model_path))
        except Exception as e:  # sentencepiece raises bare RuntimeErrors/OSErrors
            raise MixtralError(f"{model_path}: not a sentencepiece model ({e})") from None
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> List[int]:
        return ([self.bos_id] if bos else []) + self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))

    def text_stream(self) -> "TextStream":
        return TextStream(self._sp)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text as soon as it is final; the pieces joined equal decode(all ids) (TextStream)."""
        stream = self.text_stream()
        for i in ids:
            if piece := stream.push(i):
                yield piece
        if piece := stream.flush():
            yield piece


class TextStream:
    """Token ids pushed one at a time -> the text each makes final (a server pushes the ids of many replies).

    We re-decode the ids since an anchor and return what is new, holding back while the text ends in
    U+FFFD (a character whose bytes are still arriving as byte-fallback tokens). The anchor moves to
    every plain piece, so each push decodes a few tokens, not all of them; keeping the anchor token in
    the window preserves sentencepiece's leading-space handling.
    """

    def __init__(self, sp):
        self._sp, self.window, self.done = sp, [], 0  # ids from the anchor on; chars of decode(window) sent

    def push(self, i: int) -> str:
        self.window.append(int(i))
        text = self._sp.decode(self.window)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.done :]
        if not self._sp.is_byte(self.window[-1]):
            self.window = [self.window[-1]]
            self.done = len(self._sp.decode(self.window))
        else:
            self.done = len(text)
        return piece

    def flush(self) -> str:
        """What is left (an incomplete character's replacement), once the ids end."""
        return self._sp.decode(self.window)[self.done :] if self.window else ""
