"""Templates for prompt/response records: "chat", "alpaca", "plain", or "auto".

"chat" uses the tokenizer's chat template (user -> assistant; the assistant's tokens are
targets), "alpaca" ``### Instruction: ... ### Response:`` (the official ATKD code's format),
"plain" the prompt then the response as given. "auto" is chat when the tokenizer has a chat
template; otherwise alpaca for instruction data (the Dolly and Alpaca layouts, however their
fields were named) and plain for other prompt/response pairs and zoo:docstrings.
"""

from __future__ import annotations

from typing import NamedTuple

from kdviz.data.read import Record

TEMPLATES = ("auto", "chat", "alpaca", "plain")
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n{context_block}### Response:\n"


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}.")
    return template


def resolve_template(template: str, tokenizer, *, instruction: bool = True) -> str:
    """The template to use: `template`, or for "auto" chat when the tokenizer has one, else alpaca or plain."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if check_template(template) == "auto":
        template = "chat" if has_chat else ("alpaca" if instruction else "plain")
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' needs a tokenizer with a chat template, and this one has none; use "
                         "template='alpaca' (### Instruction / ### Response) or 'plain'.")
    return template


class Segment(NamedTuple):
    """A piece of formatted text: the template's own (`user` False: its control tokens are control tokens) or the
    user's (`user` True: a control-token string in it, such as "<|im_end|>" in a tutorial, is plain text)."""

    text: str
    user: bool


class Formatted(NamedTuple):
    """A record under a template: its prompt and response as segments, and whether kdviz appends EOS."""

    prompt: tuple[Segment, ...]
    response: tuple[Segment, ...]
    eos: bool

    @property
    def prompt_text(self) -> str:
        return "".join(segment.text for segment in self.prompt)

    @property
    def response_text(self) -> str:
        return "".join(segment.text for segment in self.response)


SENTINELS = ("KDVIZUSERTEXT7f3a9c", "KDVIZASSISTANTTEXT7f3a9c")  # stand-ins that no template changes


def format_record(record: Record, template: str, tokenizer) -> Formatted:
    """`record` under `template`: the prompt and the response, split into template text and user text."""
    if template == "alpaca":
        block = f"### Input:\n{record.context.strip()}\n\n" if record.context.strip() else ""
        prompt = INSTRUCTION_TEMPLATE.format(instruction=record.prompt.strip(), context_block=block)
        return Formatted((Segment(prompt, True),), (Segment(record.response, True),), True)
    user = f"{record.prompt}\n\n{record.context}" if record.context.strip() else record.prompt
    if template == "plain":
        return Formatted((Segment(user, True),), (Segment(record.response, True),), True)
    return _chat(record, user, tokenizer)


def _render(tokenizer, user: str, response: str) -> tuple[str, str]:
    """(prompt with the generation prompt, the whole conversation) as the chat template renders them."""
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    return prompt, full


def _chat(record: Record, user: str, tokenizer) -> Formatted:
    """The chat template rendered around stand-ins, so the user's and the assistant's texts are known segments."""
    prompt, full = _render(tokenizer, user, record.response)
    if not full.startswith(prompt):
        raise ValueError(f"{record.where}: the tokenizer's chat template does not render the conversation as the "
                         "prompt followed by the answer, so the answer's tokens cannot be found; use template="
                         "'alpaca' or 'plain'.")
    marked_prompt, marked_full = _render(tokenizer, *SENTINELS)
    before, found, after = marked_prompt.partition(SENTINELS[0])
    reply_before, found_reply, reply_after = marked_full[len(marked_prompt):].partition(SENTINELS[1])
    segments = Formatted((Segment(before, False), Segment(user, True), Segment(after, False)),
                         (Segment(reply_before, False), Segment(record.response, True),
                          Segment(reply_after.rstrip("\n"), False)), False)
    if found and found_reply and segments.prompt_text == prompt and segments.response_text == \
            full[len(prompt):].rstrip("\n"):
        return segments
    specials = [t for t in tokenizer.all_special_tokens if t in user or t in record.response]
    if specials:  # the template changes the texts (e.g. trims them): their spans are unknown
        raise ValueError(f"{record.where}: the text holds the control token(s) {specials}, and this chat template "
                         "rewrites the messages, so kdviz cannot keep them as plain text; remove them from the data "
                         "or use template='alpaca' or 'plain'.")
    return Formatted((Segment(prompt, False),), (Segment(full[len(prompt):].rstrip("\n"), False),), False)


def stop_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a response under `template`: EOS, and for "chat" the template's end-of-turn token (the
    first token the template writes after the assistant's text, e.g. <|im_end|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template == "chat":
        marked_prompt, marked_full = _render(tokenizer, *SENTINELS)
        after = marked_full[len(marked_prompt):].partition(SENTINELS[1])[2]
        closing = tokenizer(after, add_special_tokens=False)["input_ids"]
        ids += closing[:1]
    return sorted(set(ids))
