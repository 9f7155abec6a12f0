"""Structured outputs, tools and the chat template's options over real HTTP with the official openai
client, on a tiny random model (its free output is noise, so conforming outputs show the constraints
at work) with two random adapters; and the tool-call parsers on hand-written texts."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pytest
import torch
from live_server import KEY, Server, tiny_model_dir
from pydantic import BaseModel, ConfigDict, Field

from loramux.config import ModelConfig
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter
from loramux.server.tool_parsers import HermesParser, Llama3JsonParser, ParsedCall

MODEL = "tiny"
ADAPTERS = ("poet", "coder")
# the default template behind a variable of its own, to see chat_template_kwargs reach the template
SHOUT = "{%- if shout %}LOUD AND CLEAR {% endif %}"
ASK = [{"role": "user", "content": "Tell me something."}]


class Person(BaseModel):
    """Bounded fields: a random model's output of this schema ends within a few dozen tokens."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    admin: bool


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=6)
    unit: Literal["c", "f"]


class Clock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zone: Literal["utc", "cet", "pst"]


def tool(name: str, params: type[BaseModel]) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name}.", "parameters": params.model_json_schema()}}


TOOLS = [tool("get_weather", Weather), tool("get_time", Clock)]
ARGUMENTS = {"get_weather": Weather, "get_time": Clock}
EMAIL = r"[a-z]{1,6}@[a-z]{2,5}\.com"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    source = tiny_model_dir(root / "source")
    model = tiny_model_dir(root / MODEL, chat_template=SHOUT + (source / "chat_template.jinja").read_text())
    config = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    flags = []
    for i, name in enumerate(ADAPTERS):
        adapter = LoraAdapter.create(name, LoraConfig(r=4, alpha=8), config, generator=torch.Generator().manual_seed(i + 1), init_b="random")
        save_peft_adapter(adapter, root / "adapters" / name)
        flags += ["--adapter", f"{name}={root / 'adapters' / name}"]
    srv = Server(root / "data", "--model", str(model), "--api-key", KEY, *flags)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def check_call(call) -> None:
    """A call names a tool and its arguments validate against that tool's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)


def reassembled(stream) -> tuple[dict[int, str], dict[int, list[tuple[str, str]]], dict[int, str]]:
    """Per choice index: the content, the tool calls (name, arguments) and the finish reason."""
    content: dict[int, str] = {}
    calls: dict[int, dict[int, list[str]]] = {}
    reasons: dict[int, str] = {}
    for event in stream:
        for choice in event.choices:
            content[choice.index] = content.get(choice.index, "") + (choice.delta.content or "")
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(choice.index, {}).setdefault(d.index, ["", ""])
                if d.id is not None:  # the call's first delta: id, type and name, arguments ""
                    assert d.type == "function" and d.function.name and d.function.arguments == "" and entry == ["", ""]
                    entry[0] = d.function.name
                entry[1] += d.function.arguments or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return content, {i: [tuple(c) for _, c in sorted(cs.items())] for i, cs in calls.items()}, reasons


# --- structured outputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", [MODEL, "poet"])
def test_parse_returns_the_pydantic_object(client, model):
    reply = client.chat.completions.parse(model=model, messages=ASK, response_format=Person, max_tokens=100, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person), choice.message.content


def test_json_object_choice_regex_and_grammar_outputs_conform(client, default_tokenizer):
    # sampled, a random model rambles inside a JSON string: a bias on '"' closes it at its first chance
    quote = default_tokenizer.convert_tokens_to_ids('"')
    json_object = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                                 max_tokens=150, temperature=1, seed=1, logit_bias={str(quote): 100})
    assert isinstance(json.loads(json_object.choices[0].message.content), dict)
    cases = [({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
             ({"regex": EMAIL}, lambda t: re.fullmatch(EMAIL, t)),
             ({"grammar": 'root ::= "(" [0-9] [0-9]? ") " ("yes" | "no")'}, lambda t: re.fullmatch(r"\(\d\d?\) (yes|no)", t)),
             ({"grammar": 'start: "<" WORD ">"\nWORD: /[a-z]{1,4}/'}, lambda t: re.fullmatch(r"<[a-z]{1,4}>", t))]
    for constraint, conforms in cases:
        chat = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, extra_body={"structured_outputs": constraint})
        text = client.completions.create(model="coder", prompt="Say:", max_tokens=60, extra_body={"structured_outputs": constraint})
        for out, reason in ((chat.choices[0].message.content, chat.choices[0].finish_reason), (text.choices[0].text, text.choices[0].finish_reason)):
            assert reason == "stop" and conforms(out), (constraint, out)


def test_concurrent_constrained_and_free_requests_over_two_adapters(client):
    def constrained(i: int) -> tuple[str, str]:
        formats = [{"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}},
                   {"extra_body": {"structured_outputs": {"regex": EMAIL}}},
                   {"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}},
                   {"extra_body": {"structured_outputs": {"grammar": 'root ::= [0-9] [0-9]? [0-9]?'}}}]
        reply = client.chat.completions.create(model=ADAPTERS[i % 2], messages=[{"role": "user", "content": f"Question {i}"}],
                                               max_tokens=80, temperature=0, **formats[i])
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    def free(i: int) -> str:
        reply = client.chat.completions.create(model=ADAPTERS[i % 2], messages=[{"role": "user", "content": f"Free {i}"}],
                                               max_tokens=24, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        constrained_futures = [pool.submit(constrained, i) for i in range(4)]
        free_futures = [pool.submit(free, i) for i in range(4)]
        outs = [f.result() for f in constrained_futures]
        together = [f.result() for f in free_futures]
    Person.model_validate_json(outs[0][0])
    assert re.fullmatch(EMAIL, outs[1][0]) and outs[2][0] in ("yes", "no") and re.fullmatch(r"\d{1,3}", outs[3][0]), outs
    assert all(reason == "stop" for _, reason in outs)
    assert together == [free(i) for i in range(4)]  # alone, the free requests say exactly the same


def test_n_streaming_and_length(client):
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}}
    reply = client.chat.completions.create(model="poet", messages=ASK, max_tokens=100, n=2, temperature=1, seed=5, **schema)
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
    for c in reply.choices:
        Person.model_validate_json(c.message.content)
    stream = client.chat.completions.create(model="poet", messages=ASK, max_tokens=100, n=2, temperature=1, seed=5, stream=True, **schema)
    content, calls, reasons = reassembled(stream)
    assert content == {c.index: c.message.content for c in reply.choices} and reasons == {0: "stop", 1: "stop"} and not calls

    full = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100, temperature=0, **schema).choices[0]
    cut = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0, **schema).choices[0]
    assert cut.finish_reason == "length" and len(cut.message.content) < len(full.message.content)
    assert full.message.content.startswith(cut.message.content)  # a prefix of a valid output


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": 'root ::= "a" |'}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"tools": [tool("f", Weather)], "tool_choice": "required",
      "structured_outputs": {"regex": "a"}}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "tool_choice": "required"}, "tools"),
    ({"continue_final_message": True}, "continue_final_message"),
])
def test_invalid_constraints_and_tool_choices_are_400s_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=body)
    assert e.value.body["param"] == param and e.value.body["message"].startswith(param), e.value.body


# --- tools ----------------------------------------------------------------------------------------
def test_required_and_named_tool_choices_give_calls_that_validate(client):
    required = client.chat.completions.create(model="coder", messages=ASK, tools=TOOLS, tool_choice="required",
                                              max_tokens=150, n=2, temperature=1, seed=2)
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call)
    single = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=150, n=3, temperature=1, seed=7)
    assert all(len(c.message.tool_calls) == 1 for c in single.choices)
    for choice in single.choices:
        check_call(choice.message.tool_calls[0])
    named = client.chat.completions.create(model="poet", messages=ASK, tools=TOOLS, max_tokens=100,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and named.choices[0].finish_reason == "tool_calls"
    check_call(call)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_reassemble_to_the_same_calls(client, tool_choice):
    kwargs = {"model": "poet", "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 150, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, reasons = reassembled(client.chat.completions.create(**kwargs, stream=True))
    assert calls[0] == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert reasons == {0: "tool_calls"} and content == {0: ""}


def test_auto_reads_calls_the_model_writes(client):
    # the random model is made to write a call in hermes format, around content, by a regex
    written = (r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,5}", "unit": "c"\}\}</tool_call>'
               r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "utc"\}\}</tool_call>')
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 120, "temperature": 0,
              "extra_body": {"structured_outputs": {"regex": written}}}
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure."
    assert [c.function.name for c in whole.message.tool_calls] == ["get_weather", "get_time"]
    for call in whole.message.tool_calls:
        check_call(call)
    content, calls, reasons = reassembled(client.chat.completions.create(**kwargs, stream=True))
    assert content == {0: "Sure. "} and reasons == {0: "tool_calls"}  # streamed content is sent before the calls are seen
    assert calls[0] == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    single = client.chat.completions.create(**kwargs, parallel_tool_calls=False).choices[0]
    assert [c.function.name for c in single.message.tool_calls] == ["get_weather"]
    # without tools, or with tool_choice "none", the same text is content
    plain = client.chat.completions.create(**{**kwargs, "tools": openai.omit}).choices[0]
    assert plain.finish_reason == "stop" and plain.message.tool_calls is None and "<tool_call>" in plain.message.content


def test_a_history_with_tool_calls_and_results_is_answered(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(model="coder", messages=history, tools=TOOLS, max_tokens=4)
    bare = client.chat.completions.create(model="coder", messages=ASK, tools=TOOLS, max_tokens=4)
    assert reply.choices[0].finish_reason == "length" and reply.usage.prompt_tokens > bare.usage.prompt_tokens + 20


def test_chat_template_options(client):
    def prompt_tokens(**extra) -> int:
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, extra_body=extra).usage.prompt_tokens

    base = prompt_tokens()
    assert prompt_tokens(chat_template_kwargs={"shout": True}) > base
    assert prompt_tokens(add_generation_prompt=False) < base
    continued = client.chat.completions.create(
        model=MODEL, messages=ASK + [{"role": "assistant", "content": "Well, the"}], max_tokens=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert continued.usage.prompt_tokens > base  # the open reply is in the prompt, with no end of turn after it


# --- tool-call parsers ----------------------------------------------------------------------------
def test_hermes_parser():
    p = HermesParser()
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert p.parse(text) == ("Let me check.", [ParsedCall("get_weather", '{"city": "Oslo"}'), ParsedCall("f", "{}")])
    smol = '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_call>'  # SmolLM2's list
    assert p.parse(smol) == (None, [ParsedCall("a", '{"x": 1}'), ParsedCall("b", "{}")])
    assert p.parse('<tool_call>{"name": "a", "arguments": {"x": 1}}') == (None, [ParsedCall("a", '{"x": 1}')])  # unclosed at the end
    assert p.parse("no calls <tool_call>{not json}</tool_call>") == ("no calls <tool_call>{not json}</tool_call>", [])
    assert p.call_start("abc <tool_call>{") == 4 and p.held_back("abc <tool_") == len("<tool_") and p.held_back("abc") == 0
    rendered = p.render([{"function": {"name": "a", "arguments": '{"x": 1}'}}])
    assert p.parse(rendered) == (None, [ParsedCall("a", '{"x": 1}')])


def test_llama3_json_parser():
    p = Llama3JsonParser()
    assert p.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}') == (None, [ParsedCall("get_weather", '{"city": "Oslo"}')])
    two = '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"y": [1, 2]}}'
    assert p.parse(two) == (None, [ParsedCall("a", "{}"), ParsedCall("b", '{"y": [1, 2]}')])
    assert p.parse('Hello {"name": "a", "parameters": {}}') == ('Hello {"name": "a", "parameters": {}}', [])
    assert p.parse('{"name": "a", "parameters": {"x": 1}} trailing words')[1] == []
    assert p.call_start('  {"name"') == 2 and p.call_start("Hi {") == -1 and p.held_back("  ") == 2 and p.held_back("Hi") == 0
    rendered = p.render([{"function": {"name": "a", "arguments": '{"x": 1}'}}, {"function": {"name": "b", "arguments": "{}"}}])
    assert p.parse(rendered) == (None, [ParsedCall("a", '{"x": 1}'), ParsedCall("b", "{}")])
