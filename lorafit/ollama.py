"""Ollama Modelfiles for exported GGUF files: FROM, ADAPTER, TEMPLATE (Go template syntax), SYSTEM, PARAMETER stop.

What Ollama does with a Modelfile is taken from its source (github.com/ollama/ollama): parser/parser.go reads
the file, template/template.go renders TEMPLATE, server/routes.go inserts SYSTEM into conversations.
"""

from __future__ import annotations

from lorafit.errors import LorafitError

# Ollama's own ChatML template, byte for byte (template/chatml.gotmpl); Ollama renders it with .Messages.
CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                   '{{ end }}<|im_start|>assistant\n')
STOP = "<|im_end|>"


def ollama_modelfile(tokenizer, model_from: str, adapter: str | None = None) -> tuple[str, str]:
    """An Ollama Modelfile, and a one-line note on its template.

    ``model_from`` goes after FROM (``./model.gguf`` beside a full export; the base GGUF file or folder for an
    adapter-only export), ``adapter`` after ADAPTER. Ollama resolves relative paths against the Modelfile's
    folder. A path Ollama's parser cannot read back exactly raises LorafitError.

    A chat template is translated only when it is ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``, possibly
    with a default system prompt) and the translation is proven on sample conversations: rendering them with
    the model's own template gives exactly what Ollama's rendering gives. Otherwise the Modelfile has no
    TEMPLATE, and the note says so.
    """
    lines = [f"FROM {_argument('FROM', model_from)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {_argument('ADAPTER', adapter)}")
    chat_lines, note = _chat_lines(tokenizer)
    return "\n".join(lines + chat_lines) + "\n", note


def _chat_lines(tokenizer) -> tuple[list[str], str]:
    """TEMPLATE, SYSTEM and PARAMETER stop lines for a ChatML model, or none and the reason."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        return [], ("no TEMPLATE: the chat template is not ChatML, the one family lorafit translates; add a "
                    "TEMPLATE by hand (Ollama's template syntax)")
    system = _default_system(tokenizer)
    if not _chatml_matches(tokenizer, system):
        return [], ("no TEMPLATE: the chat template looks like ChatML but renders sample conversations "
                    "differently; add a TEMPLATE by hand")
    # Without its SYSTEM line the TEMPLATE would render conversations without a system message differently.
    if system and _triple_quoted(system) is None:
        return [], ("no TEMPLATE: the template's default system prompt holds characters a Modelfile cannot carry "
                    '(control characters or """); add TEMPLATE and SYSTEM by hand')
    lines = [f"TEMPLATE {_triple_quoted(CHATML_TEMPLATE)}"]
    if system:
        lines.append(f"SYSTEM {_triple_quoted(system)}")
    lines.append(f'PARAMETER stop "{STOP}"')
    with_system = " with the template's default system prompt as SYSTEM" if system else ""
    return lines, f"ChatML TEMPLATE{with_system}, stop at {STOP}"


# How parser/parser.go (ParseFile, parseRuneForState, unquote) reads a value: after the command and a space,
# it collects characters up to a line break at which the collected text, stripped of surrounding whitespace,
# is either unquoted or a complete "..." or """...""" string; the quotes are then removed, nothing else (there
# are no escapes). Characters strconv.IsPrint rejects are dropped, except tabs and line breaks.


def _argument(command: str, value: str) -> str:
    """``value`` written so that Ollama reads it back exactly: bare where it can be (as Ollama's own
    Command.String writes paths), else in double quotes or, when it holds one, in triple quotes."""
    if not value:
        raise LorafitError(f"{command} needs a path; an empty one would make Ollama read the Modelfile's folder")
    if not _kept(value):
        raise LorafitError(f"{command} {value!r}: Ollama's Modelfile parser drops control and other unprintable "
                           "characters, so this path cannot be written; rename the file or folder")
    if value == value.strip() and not value.startswith('"') and "\n" not in value and "\r" not in value:
        return value  # spaces inside a bare value are kept: only a line break ends it
    if '"' not in value:
        return f'"{value}"'
    if (quoted := _triple_quoted(value)) is not None:
        return quoted
    raise LorafitError(f'{command} {value!r}: a path that holds """ and needs quoting (line break, leading or '
                       "trailing space) cannot be written in an Ollama Modelfile; rename the file or folder")


def _triple_quoted(value: str) -> str | None:
    """``value`` in triple quotes, or None when Ollama would not read it back exactly. Without triple quotes
    inside, no line break can end the value early: the text before it never ends in triple quotes."""
    return f'"""{value}"""' if _kept(value) and '"""' not in value else None


def _kept(value: str) -> bool:
    # str.isprintable and Go's strconv.IsPrint agree: letters, marks, numbers, punctuation, symbols, ASCII space.
    return all(c.isprintable() or c in "\t\n\r" for c in value)


def _default_system(tokenizer) -> str | None:
    """The system prompt the template adds when a conversation has none (SmolLM2's does), else None."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    head = "<|im_start|>system\n"
    return text[len(head):text.index("<|im_end|>")] if text.startswith(head) else None


def _ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    """The conversation Ollama's chat handler renders for a Modelfile with ``SYSTEM system``.

    server/routes.go (ChatHandler): ``if req.Messages[0].Role != "system" && m.System != ""`` the SYSTEM text
    goes first as a system message; a conversation that starts with its own system message keeps it and gets
    no SYSTEM. (GenerateHandler likewise puts SYSTEM before the prompt.) Ollama also merges consecutive
    messages of one role (template/template.go, collate); the sample conversations alternate roles, as chat
    templates expect.
    """
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def _chatml_matches(tokenizer, system: str | None) -> bool:
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    for messages in conversations:
        # What CHATML_TEMPLATE renders from the conversation Ollama builds...
        chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                         for m in _ollama_messages(messages, system))
        # ...must equal what the model's template renders from the conversation as sent.
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered != chatml + "<|im_start|>assistant\n":
            return False
    return True
