"""common/tools.py on its own: the Hermes-style fallback and the native tools rendering with the real SmolLM2
tokenizer, the forced JSON schemas against the real grammar engine, and the answer parser fed whole and in every
split (a stream and its unary twin must agree)."""

from __future__ import annotations

import json

import pytest

from llmserve.common import tools as t
from llmserve.common.structured import Constraint, GrammarCompiler
from tests.helpers.tiny_models import smollm2_tokenizer

WEATHER = t.ToolSpec("get_weather", "Current weather of a city", json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
     "required": ["city"]}))
TIME = t.ToolSpec("get_time", "", "")
NAMES = ("get_weather", "get_time")

# A ChatML template that renders tools itself (as Qwen2.5's does), to test the native path.
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for tool in tools %}{{ tool.function.name }};{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.id }} {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}{% endif %}{% if m.tool_call_id %} FOR {{ m.tool_call_id }}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def render(tokenizer, messages, tools) -> str:
    conversation, tools_arg = t.template_inputs(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(conversation, tools=tools_arg, add_generation_prompt=True, tokenize=False)


ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [t.ToolCall("call_1", "get_weather", '{"city": "Paris"}')]},
    {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
    {"role": "tool", "content": '{"temp": 22}', "tool_call_id": "call_2"},
]


def test_smollm2_template_does_not_render_tools_so_the_fallback_does(tokenizer):
    assert not t.template_renders_tools(tokenizer)
    text = render(tokenizer, ROUND_TRIP, [WEATHER, TIME])
    # The preamble replaces SmolLM2's default system message and lists each tool as one JSON line.
    assert text.startswith("<|im_start|>system\n# Tools\n") and "named SmolLM" not in text
    assert json.dumps(WEATHER.openai()) in text and '"name": "get_time"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>") in text
    # Both tool results in one user turn, in order.
    assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n"
            "{\"temp\": 22}\n</tool_response><|im_end|>\n<|im_start|>assistant\n") in text


def test_fallback_appends_to_an_existing_system_message_and_renders_calls_without_tools(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *ROUND_TRIP]
    text = render(tokenizer, messages, [WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert text.count("<|im_start|>system") == 1
    # tool_choice "none" sends no tools: earlier calls and results still render, without the preamble.
    plain = render(tokenizer, messages, [])
    assert "# Tools" not in plain and "<tool_call>\n" in plain and "<tool_response>" in plain


def test_a_template_that_renders_tools_gets_them_natively(tokenizer):
    native = smollm2_tokenizer()
    native.chat_template = NATIVE_TEMPLATE
    assert t.template_renders_tools(native)
    text = render(native, ROUND_TRIP, [WEATHER, TIME])
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;get_time;<|im_end|>")
    assert 'CALL call_1 get_weather {"city": "Paris"}' in text  # arguments reach the template as an object
    assert "FOR call_1<|im_end|>" in text and "<tool_call>" not in text


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer)


def accepts(compiler, tokenizer, schema: dict, text: str) -> bool:
    matcher = compiler.compile(Constraint("json_schema", json.dumps(schema))).matcher()
    return all(matcher.accept(i) for i in tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting


def test_forced_schemas_compile_and_admit_only_valid_calls(compiler, tokenizer):
    named = t.forced_schema([WEATHER, TIME], named="get_weather")
    assert accepts(compiler, tokenizer, named, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert not accepts(compiler, tokenizer, named, '{"name": "get_time", "arguments": {}}')
    assert not accepts(compiler, tokenizer, named, '{"name": "get_weather", "arguments": {"days": 2}}')
    one = t.forced_schema([WEATHER, TIME], parallel=False)
    assert accepts(compiler, tokenizer, one, '{"name": "get_time", "arguments": {}}')
    many = t.forced_schema([WEATHER, TIME], parallel=True)
    assert accepts(compiler, tokenizer, many, '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", '
                                              '"arguments": {"city": "Rome", "days": 2}}]')
    assert not accepts(compiler, tokenizer, many, "[]")
    # Arguments the schema does not list are closed off (what is admitted still validates against the schema).
    assert not accepts(compiler, tokenizer, named, '{"name": "get_weather", "arguments": {"city": "P", "x": 1}}')


def test_chat_ids_templates_tools_and_equals_the_plain_template_without_them(tokenizer):
    plain = [{"role": "user", "content": "Hi"}]
    assert t.chat_ids(tokenizer, plain) == tokenizer.apply_chat_template(plain, add_generation_prompt=True,
                                                                         tokenize=True, return_dict=False)
    with_tools = tokenizer.decode(t.chat_ids(tokenizer, plain, [WEATHER]))
    assert with_tools.startswith("<|im_start|>system\n# Tools") and with_tools.endswith("<|im_start|>assistant\n")


def feed_in_pieces(parser: t.ToolCallParser, text: str, cuts: tuple[int, ...]) -> t.ParsedAnswer:
    events = []
    last = 0
    for cut in (*cuts, len(text)):
        events += parser.feed(text[last:cut])
        last = cut
    return t.collect([*events, *parser.finish()])


def every_split(make_parser, text: str):
    """The answer parsed whole, and parsed fed in two pieces at every position (ids aside)."""
    whole = t.parse_answer(text, make_parser())
    for cut in range(len(text) + 1):
        split = feed_in_pieces(make_parser(), text, (cut,))
        assert split.content == whole.content
        assert [(c.name, c.arguments) for c in split.calls] == [(c.name, c.arguments) for c in whole.calls]
    return whole


def test_auto_parses_hermes_blocks_and_keeps_the_text_around_them():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name":"get_time","arguments":{}}</tool_call>\n')
    answer = every_split(lambda: t.ToolCallParser(NAMES), text)
    assert answer.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in answer.calls] == [("get_weather", {"city": "Paris"}),
                                                                         ("get_time", {})]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in answer.calls)
    assert answer.calls[0].id != answer.calls[1].id
    single = t.parse_answer(text, t.ToolCallParser(NAMES, parallel=False))
    assert [c.name for c in single.calls] == ["get_weather"]


@pytest.mark.parametrize("text", [
    "Plain answer, no tools.  \n",
    "Half a tag <tool_ca",
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # not JSON
    '<tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call>',  # not a tool of the request
    '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa',  # never closed
    'Let me see. \n<tool_call>{"name": "get_weather", "arguments": {"city": "Pa',  # never closed, after text
])
def test_auto_leaves_anything_but_a_valid_call_as_content(text):
    answer = every_split(lambda: t.ToolCallParser(NAMES), text)
    assert answer.calls == [] and answer.content == text


def test_auto_accepts_arguments_written_as_json_text_and_mixed_valid_and_invalid_blocks():
    text = ('<tool_call>{"name": "get_weather", "parameters": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'
            '<tool_call>not json</tool_call>')
    answer = every_split(lambda: t.ToolCallParser(NAMES), text)
    assert [(c.name, c.arguments) for c in answer.calls] == [("get_weather", '{"city": "Oslo"}')]
    assert answer.content == "<tool_call>not json</tool_call>"


def test_forced_output_streams_arguments_as_they_come():
    text = '{"name": "get_weather", "arguments": {"city": "Pa}ris \\" {", "days": 3}}'
    answer = every_split(lambda: t.ToolCallParser(NAMES, forced=True), text)
    assert answer.content == "" and [(c.name, c.arguments) for c in answer.calls] == [
        ("get_weather", '{"city": "Pa}ris \\" {", "days": 3}')]
    parser = t.ToolCallParser(NAMES, forced=True)
    first = parser.feed('{"name": "get_weather", "arguments": {"ci')
    assert [(e.index, e.name, e.arguments) for e in first] == [(0, "get_weather", ""), (0, "", '{"ci')]
    assert parser.feed('ty": "X"}') == [t.CallDelta(0, arguments='ty": "X"}')]
    assert parser.feed("}") == [] and parser.finish() == []


def test_forced_list_of_calls_and_a_cut_off_answer():
    text = ('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]')
    answer = every_split(lambda: t.ToolCallParser(NAMES, forced=True, array=True), text)
    assert [(c.name, c.arguments) for c in answer.calls] == [("get_time", "{}"),
                                                             ("get_weather", '{"city": "Rome"}')]
    cut = t.parse_answer('{"name": "get_weather", "arguments": {"ci', t.ToolCallParser(NAMES, forced=True))
    assert [(c.name, c.arguments) for c in cut.calls] == [("get_weather", '{"ci')]  # as OpenAI: cut arguments
    early = t.parse_answer('{"na', t.ToolCallParser(NAMES, forced=True))
    assert early.calls == [] and early.content == '{"na'


def test_finish_reason():
    assert t.finish_reason("stop", True) == "tool_calls"
    assert t.finish_reason("length", True) == "length"
    assert t.finish_reason("stop", False) == "stop"
