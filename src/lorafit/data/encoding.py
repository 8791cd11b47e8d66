"""Chat conversations to token ids and trained-token masks, many at a time.

Each conversation is rendered with the tokenizer's chat template (or PLAIN_TEMPLATE) into one text; every
text of a batch goes through one call of the tokenizer (a fast tokenizer spreads it over the cores), and the
characters each assistant turn adds to that text are mapped to tokens by the tokenizer's own offsets. So the
only Python work per record is a few renders and array operations, never a loop over tokens; the ids come
back as numpy arrays (int32), four bytes a token instead of a Python int's 28.

What is trained: every token that holds a character of an assistant turn as the template renders it (the
reply and the template's end-of-turn text), not the whitespace a template puts after the turn's EOS, which
generation never produces; the prompt only with train_on_prompt. A token that straddles the boundary
between prompt and reply holds the reply's first characters and is trained. The sequence ends with a
trained EOS, the token generation stops on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# chat templates are jinja; transformers needs it for apply_chat_template
from jinja2 import TemplateError

from lorafit.data.records import TEXT_ROLE  # a lone {"role": "text"} message: the whole text trained, no template
from lorafit.errors import LorafitError

# Used when the tokenizer has no chat template (base models such as GPT-2). Written as a chat template
# so both cases go through the same span-finding code. Each response ends with EOS so the model learns
# to stop; turns after the first are separated by a blank line. Literal text sits in {{ '...' }}
# because transformers renders templates with trim_blocks, which eats a newline after a block tag.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message.role == 'system' %}{{ message.content }}"
    "{% elif message.role == 'user' %}{{ '### Instruction:\\n' + message.content }}"
    "{% else %}{{ '### Response:\\n' + message.content + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)



def chat_template_record(tokenizer) -> dict:
    """Which chat template renders conversations for this tokenizer, as a run records it: the model's own, or
    PLAIN_TEMPLATE when its tokenizer has none; with the template text's SHA-256 to tell a later change."""
    import hashlib

    own = bool(getattr(tokenizer, "chat_template", None))
    text = tokenizer.chat_template if own else PLAIN_TEMPLATE
    if not isinstance(text, str):  # several named templates: their texts in name order
        text = "\n".join(f"{k}\n{v}" for k, v in sorted(dict(text).items()))
    return {"source": "model" if own else "lorafit-plain", "sha256": hashlib.sha256(text.encode()).hexdigest()}


def describe_chat_template(record: dict) -> str:
    """The `chat template:` line every command that renders conversations prints."""
    if record["source"] == "model":
        return f"the model's own (sha256 {record['sha256'][:12]})"
    return ("none in the model's tokenizer, so lorafit's plain format ('### Instruction:' / '### Response:', ending "
            "in EOS), for training, eval and generate alike; give the tokenizer a chat_template to use another")


# What happened to a record within max_length (EncodedRecord.outcome). Records are always cut to max_length
# here; whether a cut record trains (--overflow truncate) or is skipped is the caller's choice, so one
# encoding serves both, and held-out evaluation (which uses only records that fit whole).
FITS = 0  # whole, with trained tokens
CUT = 1  # longer than max_length; what fits still has trained tokens
NOTHING_TRAINED = 2  # whole, but no token to train on (an empty 'text')
CUT_TO_NOTHING = 3  # longer than max_length, and nothing trained is left within it


@dataclass(frozen=True)
class EncodedRecord:
    """One conversation as the model sees it: `ids` (int32) and `trained` (bool), cut to max_length."""

    ids: np.ndarray
    trained: np.ndarray
    outcome: int


class ConversationEncoder:
    """Encodes batches of conversations for one tokenizer, max_length and train_on_prompt.

    Built once per run: it finds out once what the tokenizer does (template, BOS, EOS, fast offsets).
    """

    def __init__(self, tokenizer, max_length: int, train_on_prompt: bool = False) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise LorafitError(f"max_length must be an integer of at least 2, got {max_length!r}")
        if tokenizer.eos_token_id is None:
            raise LorafitError(
                "the tokenizer has no EOS token, so the model could not learn to stop; set tokenizer.eos_token"
            )
        self.tokenizer, self.max_length, self.train_on_prompt = tokenizer, max_length, train_on_prompt
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.convert_ids_to_tokens(self.eos_id)
        self.has_template = bool(tokenizer.chat_template)
        self.adds_bos = tokenizer_adds_bos(tokenizer)
        self.fast = bool(getattr(tokenizer, "is_fast", False))

    def encode(self, conversations: list[list[dict]], places: list[str]) -> list[EncodedRecord]:
        """Encode every conversation; `places` names each one (file:line) in an error message ("": none)."""
        for messages, place in zip(conversations, places, strict=True):
            if not messages:
                raise LorafitError(f"{_at(place)}a conversation has no messages")
        rows = range(len(conversations))
        chats = [row for row in rows if conversations[row][0]["role"] != TEXT_ROLE]
        chat_texts, chat_spans = self._render_chats([conversations[row] for row in chats],
                                                    [places[row] for row in chats])
        # a text record: its text, all trained (spans None), BOS as plain tokenizer(text) would put it
        texts = [conversations[row][0]["content"] for row in rows]
        spans, add_bos = [None] * len(texts), [self.adds_bos] * len(texts)
        for row, text, text_spans in zip(chats, chat_texts, chat_spans, strict=True):
            # a chat: the template's rendering; a real template places BOS itself
            texts[row], spans[row], add_bos[row] = text, text_spans, not self.has_template and self.adds_bos
        return [self._finish(ids, trained) for ids, trained in self._tokens_and_masks(texts, spans, add_bos)]

    # -- rendering ------------------------------------------------------------------------------------------
    def _render_chats(self, chats: list[list[dict]], places: list[str]) -> tuple[list[str], list[list]]:
        """Each chat's text and the character spans of its assistant turns.

        A turn's characters are those the rendering of messages[:i+1] adds to that of messages[:i] with the
        generation prompt. That only works for a template that renders earlier turns the same however many
        turns follow (prefix-stable); checked here on the text, and refused for templates that are not.
        """
        if not chats:
            return [], []
        trimmed = []
        for messages, place in zip(chats, places, strict=True):
            replies = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
            if not replies:
                raise LorafitError(f"{_at(place)}a conversation has no assistant turn, so there is nothing to train on")
            # turns after the last reply would only be masked prompt with nothing to predict after them
            trimmed.append(messages[: replies[-1] + 1])
        full = self._render(trimmed, False, places)
        prompts, turns, owners = [], [], []
        for row, messages in enumerate(trimmed):
            for index, message in enumerate(messages):
                if message["role"] == "assistant":
                    prompts.append(messages[:index])
                    # the last reply's turn ends the trimmed conversation: its rendering is the full text
                    turns.append(messages[: index + 1] if index < len(messages) - 1 else None)
                    owners.append((row, index))
        prompt_texts = self._render(prompts, True, [places[row] for row, _ in owners])
        partial = [t for t in turns if t is not None]
        partial_texts = iter(self._render(partial, False, [places[row] for (row, _), t in zip(owners, turns)
                                                           if t is not None]))
        spans: list[list] = [[] for _ in trimmed]
        for (row, index), prompt_text, turn in zip(owners, prompt_texts, turns, strict=True):
            text = full[row]
            turn_text = text if turn is None else next(partial_texts)
            if not (text.startswith(turn_text) and turn_text.startswith(prompt_text)):
                raise LorafitError(
                    f"{_at(places[row])}the chat template is not prefix-stable: its rendering up to assistant turn "
                    f"{index} is not the start of the longer conversation's rendering, so the trained tokens cannot "
                    "be located; use a template that renders earlier turns identically, or plain 'text' records"
                )
            spans[row].append(self._without_whitespace_after_eos(text, len(prompt_text), len(turn_text)))
        return full, spans

    def _render(self, conversations: list[list[dict]], add_generation_prompt: bool, places: list[str]) -> list[str]:
        """Rendered texts, in one call of the template for the batch (per-call overhead dominates single renders)."""
        if not conversations:
            return []
        template = None if self.has_template else PLAIN_TEMPLATE
        try:
            return self.tokenizer.apply_chat_template(conversations, tokenize=False, chat_template=template,
                                                      add_generation_prompt=add_generation_prompt)
        except TemplateError:
            # say which conversation: render them one at a time until the template refuses one
            for messages, place in zip(conversations, places, strict=True):
                try:
                    self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template,
                                                       add_generation_prompt=add_generation_prompt)
                except TemplateError as err:  # e.g. a template's raise_exception("roles must alternate")
                    raise LorafitError(f"{_at(place)}the chat template rejected the conversation: {err}") from None
            raise

    def _without_whitespace_after_eos(self, text: str, start: int, end: int) -> tuple[int, int]:
        """The span less whitespace after its last EOS: ChatML ends a turn with <|im_end|> and a newline."""
        stop = text.rfind(self.eos_text, start, end)
        if stop >= 0 and not text[stop + len(self.eos_text): end].strip():
            end = stop + len(self.eos_text)
        return start, end

    # -- tokens -------------------------------------------------------------------------------------------
    def _tokens_and_masks(self, texts: list[str], spans: list, add_bos: list[bool]):
        """(ids, trained) per text: one tokenizer call for the batch, spans mapped by the tokenizer's offsets."""
        if not texts:
            return
        batch = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
        encodings = batch.encodings if self.fast else None
        for row, (text, text_spans, bos) in enumerate(zip(texts, spans, add_bos, strict=True)):
            ids = np.asarray(batch["input_ids"][row], dtype=np.int32)
            if text_spans is None or self.train_on_prompt:
                trained = np.ones(len(ids), dtype=bool)
            else:
                trained = np.zeros(len(ids), dtype=bool)
                for start, end in text_spans:
                    first, stop = (self._token_range(encodings[row], start, end) if encodings is not None
                                   else self._token_range_slow(text, ids, start, end))
                    trained[first:stop] = True
            if bos and (len(ids) == 0 or ids[0] != self.tokenizer.bos_token_id):
                ids = np.concatenate([np.asarray([self.tokenizer.bos_token_id], dtype=np.int32), ids])
                trained = np.concatenate([[text_spans is None or self.train_on_prompt], trained])
            yield ids, trained

    @staticmethod
    def _token_range(encoding, start: int, end: int) -> tuple[int, int]:
        """Tokens holding any character in [start, end): from the fast tokenizer's character offsets."""
        if start >= end:
            return 0, 0
        first = next((t for c in range(start, end) if (t := encoding.char_to_token(c)) is not None), None)
        last = next((t for c in range(end - 1, start - 1, -1) if (t := encoding.char_to_token(c)) is not None), None)
        return (0, 0) if first is None else (first, last + 1)

    def _token_range_slow(self, text: str, ids: np.ndarray, start: int, end: int) -> tuple[int, int]:
        """The same for a tokenizer without offsets (a Python one): where the ids of the text cut at each
        boundary part from the whole text's ids; a token merged across the boundary differs, and is trained."""
        def boundary(position: int) -> int:
            head = np.asarray(self.tokenizer(text[:position], add_special_tokens=False)["input_ids"], dtype=np.int32)
            common = min(len(head), len(ids))
            differs = np.flatnonzero(head[:common] != ids[:common])
            return int(differs[0]) if len(differs) else common
        return boundary(start), boundary(end)

    def _finish(self, ids: np.ndarray, trained: np.ndarray) -> EncodedRecord:
        """End with a trained EOS, cut to max_length, and say whether anything is left to train."""
        ids, trained = self._end_with_eos(ids, trained)
        cut = len(ids) > self.max_length
        if cut:
            ids, trained = ids[: self.max_length], trained[: self.max_length]
        # trained[0] has no logit before it: a lone trained first token (an empty text's EOS) gives the loss nothing
        if not trained[1:].any():
            return EncodedRecord(ids, trained, CUT_TO_NOTHING if cut else NOTHING_TRAINED)
        return EncodedRecord(ids, trained, CUT if cut else FITS)

    def _end_with_eos(self, ids: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A trained EOS last. ChatML-style templates close a turn with EOS and then a newline; nothing after
        the stop token is ever generated, so such trailing whitespace is dropped instead of adding a second EOS."""
        at = np.flatnonzero(ids == self.eos_id)
        if len(at) and trained[at[-1]] and not self.tokenizer.decode(ids[at[-1] + 1:].tolist()).strip():
            return ids[: at[-1] + 1], trained[: at[-1] + 1]
        return (np.concatenate([ids, np.asarray([self.eos_id], dtype=np.int32)]),
                np.concatenate([trained, [True]]))


def _at(place: str) -> str:
    return f"{place}: " if place else ""


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether plain tokenizer(text) starts with BOS; text without a template should look the same."""
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a")["input_ids"]
    return (
        probe[:1] == [tokenizer.bos_token_id] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != probe[:1]
    )
