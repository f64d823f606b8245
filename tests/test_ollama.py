"""The Ollama Modelfile: read back with a parser written from Ollama's grammar, and its TEMPLATE rendered by Go's
own text/template (marked ``clients``) the way Ollama renders it.

Ollama sources followed (github.com/ollama/ollama): parser/parser.go (Modelfile grammar), template/template.go
(what templates are fed), server/routes.go (where the Modelfile's SYSTEM joins a conversation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from lorafit.errors import LorafitError
from lorafit.ollama import CHATML_TEMPLATE, ollama_modelfile

from .conftest import CHAT_TEMPLATE
from .test_export import bpe_tokenizer

SMOLLM_LIKE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\\nYou are SmolLM.<|im_end|>\\n' }}{% endif %}"
               "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# --- A Modelfile parser after parser/parser.go (ParseFile, parseRuneForState, unquote) ---------------------------

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}
NAME = re.compile(r"([A-Za-z]+)[ \t]")  # a command (letters), ended by a space or tab
PARAMETER_NAME = re.compile(r"([A-Za-z0-9_]*)[ \t]")
ROLE = re.compile(r"(system|user|assistant)[ \t]")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(name, value) pairs as Ollama reads them; names as in Ollama's Command.Name: ``model`` for FROM, the
    parameter's own name for PARAMETER, the lower-cased command otherwise. Commands are case-insensitive; ``#``
    starts a comment where a command could start."""
    commands, pos = [], 0
    while (pos := _skip_blanks_and_comments(text, pos)) < len(text):
        match = NAME.match(text, pos)
        assert match and match[1].lower() in COMMANDS, f"invalid command at {text[pos:pos + 30]!r}"
        name, pos = match[1].lower(), match.end()
        prefix = ""
        if name == "parameter":
            match = PARAMETER_NAME.match(text, pos)
            assert match, f"invalid parameter name at {text[pos:pos + 30]!r}"
            name, pos = match[1], match.end()
        elif name == "message":
            match = ROLE.match(text, pos)
            assert match, f"invalid message role at {text[pos:pos + 30]!r}"
            prefix, pos = f"{match[1]}: ", match.end()
        value, pos = _value(text, pos)
        commands.append(("model" if name == "from" else name, prefix + value))
    assert any(name == "model" for name, _ in commands), "no FROM line"
    return commands


def _skip_blanks_and_comments(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n#":
        if text[pos] == "#":  # a comment runs to the end of its line
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end
        pos += 1
    return pos


def _value(text: str, pos: int) -> tuple[str, int]:
    """A value runs to the first line break (or the end) at which the text so far, stripped, is complete:
    unquoted, or a whole "..." or triple-quoted string. The quotes are removed, nothing is unescaped. Characters
    that Go's strconv.IsPrint rejects are dropped, except tabs and line breaks."""
    kept = []
    for i in range(pos, len(text) + 1):
        char = text[i] if i < len(text) else None
        if char is None or char in "\r\n":
            value = _unquote("".join(kept).strip())
            if value is not None:
                return value, i
            assert char is not None, f"unexpected end of file in the quoted value {''.join(kept)!r}"
        if char.isprintable() or char in "\t\r\n":
            kept.append(char)
    raise AssertionError("unreachable")


def _unquote(s: str) -> str | None:
    if s.startswith('"""'):
        return s[3:-3] if len(s) >= 6 and s.endswith('"""') else None
    if s.startswith('"'):
        return s[1:-1] if len(s) >= 2 and s.endswith('"') else None
    return s


@pytest.mark.parametrize(("text", "expected"), [  # cases from Ollama's parser/parser_test.go (templates shortened)
    ('\nFROM foo\nSYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
     [("model", "foo"), ("system", '\nThis is a multiline system with "quotes".\n')]),
    ('FROM foo\nSYSTEM """This is a\nmultiline system."""\n',
     [("model", "foo"), ("system", "This is a\nmultiline system.")]),
    ('FROM foo\nSYSTEM """"""\n', [("model", "foo"), ("system", "")]),
    ("FROM foo\nSYSTEM \"'\"\n", [("model", "foo"), ("system", "'")]),
    ('FROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n',
     [("model", "foo"), ("system", "''\"'\"\"'\"\"'\"'''''\"\"'\"\"'")]),
    ('\nFROM "     model 1"\nADAPTER      adapter3\nPARAMETER param1        value1\n'
     'TEMPLATE """   {{ .Prompt }}\n\n{{ .Response }}   """    \n',
     [("model", "     model 1"), ("adapter", "adapter3"), ("param1", "value1"),
      ("template", "   {{ .Prompt }}\n\n{{ .Response }}   ")]),
    ('FROM "FOO  BAR  "', [("model", "FOO  BAR  ")]),
    ("FROM /what/is/the path ", [("model", "/what/is/the path")]),
    ("PARAMETER what the \nFROM lemons make lemonade ", [("what", "the"), ("model", "lemons make lemonade")]),
    ('FROM foo\nPARAMETER stop "### User: "\nPARAMETER stop """### User:\n"""',
     [("model", "foo"), ("stop", "### User: "), ("stop", "### User:\n")]),
    ("\n# comment\nFROM foo\n\t", [("model", "foo")]),
    ("FROM foo\nMESSAGE user Is Toronto in Canada?\n", [("model", "foo"), ("message", "user: Is Toronto in Canada?")]),
])
def test_the_test_parser_reads_what_ollamas_parser_tests_expect(text, expected):
    assert parse_modelfile(text) == expected


@pytest.mark.parametrize("text", ['FROM foo\nSYSTEM """This is a multiline system.""\n', 'FROM foo\nSYSTEM "\n',
                                  "PARAMETER param1 value1", "\nFROM foo\nPARAMETER param1\n",
                                  "\nFROM foo\nBADCOMMAND param1 value1\n"])
def test_the_test_parser_refuses_what_ollamas_parser_refuses(text):
    with pytest.raises(AssertionError):
        parse_modelfile(text)


# --- The Modelfile lorafit writes --------------------------------------------------------------------------------

def modelfile(template: str, model_from: str = "./model.gguf", adapter: str | None = None) -> tuple[str, str]:
    tokenizer = bpe_tokenizer()
    tokenizer.chat_template = template
    return ollama_modelfile(tokenizer, model_from, adapter=adapter)


@pytest.mark.parametrize(("template", "expected"), [
    (CHAT_TEMPLATE, ['TEMPLATE """', 'PARAMETER stop "<|im_end|>"']),
    (SMOLLM_LIKE, ['TEMPLATE """', 'SYSTEM """You are SmolLM."""', 'PARAMETER stop "<|im_end|>"']),
    ("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}", []),
], ids=["chatml", "chatml-with-default-system", "not-chatml"])
def test_ollama_modelfile_translates_only_chatml_it_has_checked(template, expected):
    text, note = modelfile(template)
    assert text.startswith("FROM ./model.gguf\n")
    for line in expected:
        assert line in text
    if not expected:
        assert "TEMPLATE" not in text and note.startswith("no TEMPLATE: the chat template is not ChatML")


def test_the_modelfile_reads_back_command_by_command():
    text, note = modelfile(SMOLLM_LIKE)
    assert parse_modelfile(text) == [("model", "./model.gguf"), ("template", CHATML_TEMPLATE),
                                     ("system", "You are SmolLM."), ("stop", "<|im_end|>")]
    assert note == "ChatML TEMPLATE with the template's default system prompt as SYSTEM, stop at <|im_end|>"


def test_an_adapter_only_export_names_base_and_adapter():
    text, _ = modelfile(CHAT_TEMPLATE, "/models/base.gguf", adapter="./adapter.gguf")
    assert text.splitlines()[:2] == ["FROM /models/base.gguf", "ADAPTER ./adapter.gguf"]
    assert parse_modelfile(text) == [("model", "/models/base.gguf"), ("adapter", "./adapter.gguf"),
                                     ("template", CHATML_TEMPLATE), ("stop", "<|im_end|>")]


@pytest.mark.parametrize(("path", "written"), [
    ("./my model.gguf", "./my model.gguf"),  # only a line break ends a value, so spaces need no quotes
    ('/data/it\'s "v2"/base.gguf', '/data/it\'s "v2"/base.gguf'),  # quotes count only at the start
    ("./model.gguf ", '"./model.gguf "'),  # unquoted, the trailing space would be stripped
    ('"odd".gguf', '""""odd".gguf"""'),  # starts with a quote and holds another: triple quotes
    ("/data/two\nlines.gguf", '"/data/two\nlines.gguf"'),
])
def test_paths_are_written_so_that_ollama_reads_them_back_exactly(path, written):
    text, _ = modelfile(CHAT_TEMPLATE, path, adapter=path)
    assert text.startswith(f"FROM {written}\nADAPTER {written}\n")
    assert parse_modelfile(text)[:2] == [("model", path), ("adapter", path)]


@pytest.mark.parametrize(("path", "reason"), [
    ("", "needs a path"),
    ("/data/bell\x07.gguf", "drops control and other unprintable characters"),
    ('/data/"""\n.gguf', 'holds """ and needs quoting'),
])
def test_paths_ollama_cannot_read_back_are_refused_with_the_reason(path, reason):
    with pytest.raises(LorafitError, match=re.escape(reason)):
        modelfile(CHAT_TEMPLATE, "./model.gguf", adapter=path)


def test_a_default_system_prompt_ollama_cannot_carry_gets_no_template():
    text, note = modelfile(SMOLLM_LIKE.replace("You are SmolLM.", 'Say """hi""".'))
    assert "TEMPLATE" not in text and "SYSTEM" not in text
    assert note.startswith("no TEMPLATE: the template's default system prompt holds characters")


def test_an_empty_default_system_prompt_gets_no_template():
    # Ollama adds SYSTEM only when it is not empty (m.System != "" in server/routes.go), so an empty system
    # block the model's template adds cannot be reproduced.
    text, note = modelfile(SMOLLM_LIKE.replace("You are SmolLM.", ""))
    assert "TEMPLATE" not in text
    assert note.startswith("no TEMPLATE: the chat template looks like ChatML but renders sample conversations")


# --- The TEMPLATE rendered by Go's text/template, fed as Ollama feeds it -------------------------------------------

RENDER_GO = r'''package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"time"
)

// The fields Ollama's templates see in .Messages (template/template.go: templateMessage).
type message struct {
	Role, Content, Thinking string
	Images                  []string
	ToolCalls               []any
	ToolName, ToolCallID    string
}

type job struct {
	Template      string
	System        string // the Modelfile's SYSTEM
	Conversations [][]message
}

// server/routes.go, ChatHandler: the Modelfile's SYSTEM goes first unless the request starts with a system message.
func withSystem(system string, msgs []message) []message {
	if msgs[0].Role != "system" && system != "" {
		return append([]message{{Role: "system", Content: system}}, msgs...)
	}
	return msgs
}

// template/template.go, collate: .System joins all system messages; consecutive messages of one role merge.
func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	// template/template.go, Parse: these options and function names.
	date := func(args ...string) string { return time.Now().Format("2006-01-02") }
	funcs := template.FuncMap{
		"json":             func(v any) string { b, _ := json.Marshal(v); return string(b) },
		"currentDate":      date,
		"yesterdayDate":    date,
		"toTypeScriptType": func(v any) string { return "any" },
	}
	var jobs []job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		panic(err)
	}
	var out [][]string
	for _, j := range jobs {
		tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(j.Template))
		var rendered []string
		for _, msgs := range j.Conversations {
			system, collated := collate(withSystem(j.System, msgs))
			var b strings.Builder
			// template/template.go, Execute: the data of a template that uses .Messages.
			data := map[string]any{"System": system, "Messages": collated, "Tools": nil, "Response": "",
				"Think": false, "ThinkLevel": "", "IsThinkSet": false}
			if err := tmpl.Execute(&b, data); err != nil {
				panic(err)
			}
			rendered = append(rendered, b.String())
		}
		out = append(out, rendered)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
'''

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Bonjour !"},
     {"role": "user", "content": 'Quote "this", {{ .Role }} & <b>that</b>\n  second line, naïve café  '}],
]


def go_render(jobs: list[dict], folder) -> list[list[str]]:
    """Renders every job's conversations in one ``go run`` (the compile takes seconds); stdlib only, offline."""
    (folder / "render.go").write_text(RENDER_GO)
    env = {**os.environ, "GOCACHE": str(folder / "gocache"), "GOPATH": str(folder / "gopath"), "GOPROXY": "off",
           "GOFLAGS": "", "GO111MODULE": "on"}
    done = subprocess.run(["go", "run", "render.go"], cwd=folder, env=env, input=json.dumps(jobs),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.clients
@pytest.mark.skipif(shutil.which("go") is None, reason="needs the Go toolchain (go on PATH) to run text/template")
def test_go_text_template_renders_conversations_as_the_models_template_does(tmp_path):
    jobs, expected = [], []
    for template in (CHAT_TEMPLATE, SMOLLM_LIKE):
        tokenizer = bpe_tokenizer()
        tokenizer.chat_template = template
        commands = dict(parse_modelfile(ollama_modelfile(tokenizer, "./model.gguf")[0]))
        assert ".Messages" in commands["template"]  # Ollama feeds .Messages only to templates that use it
        jobs.append({"Template": commands["template"], "System": commands.get("system", ""),
                     "Conversations": [[{"Role": m["role"], "Content": m["content"]} for m in messages]
                                       for messages in CONVERSATIONS]})
        expected.append([tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                         for messages in CONVERSATIONS])
    assert go_render(jobs, tmp_path) == expected
    assert "You are SmolLM." in expected[1][0]  # the SYSTEM insertion was exercised
