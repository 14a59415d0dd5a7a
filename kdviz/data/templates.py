"""Templates for prompt/response records: "chat", "alpaca", "plain", or "auto".

"chat" uses the tokenizer's chat template (user -> assistant; the assistant's tokens are
targets), "alpaca" ``### Instruction: ... ### Response:`` (the official ATKD code's format),
"plain" the prompt then the response as given. "auto" is chat when the tokenizer has a chat
template; otherwise alpaca for instruction data (the Dolly and Alpaca layouts, however their
fields were named) and plain for other prompt/response pairs and zoo:docstrings.
"""

from __future__ import annotations

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


def format_record(record: Record, template: str, tokenizer) -> tuple[str, str, bool]:
    """(prompt text, response text, whether to append EOS) of `record` under `template`."""
    if template == "alpaca":
        block = f"### Input:\n{record.context.strip()}\n\n" if record.context.strip() else ""
        return INSTRUCTION_TEMPLATE.format(instruction=record.prompt.strip(), context_block=block), record.response, True
    user = f"{record.prompt}\n\n{record.context}" if record.context.strip() else record.prompt
    if template == "plain":
        return user, record.response, True
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": record.response}],
                                         tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"{record.where}: the tokenizer's chat template does not render the conversation as the "
                         "prompt followed by the answer, so the answer's tokens cannot be found; use template="
                         "'alpaca' or 'plain'.")
    return prompt, full[len(prompt):].rstrip("\n"), False

