"""Golden renders of conversations with tools, by Hugging Face transformers' apply_chat_template.

    python scripts/make_tool_template_golden.py    # writes testdata/tools/golden.json

The template is `testdata/tools/hermes_template.jinja` (our own, in the `<tool_call>` style Qwen2.5 and
Hermes use); the tokenizer is stories260K's (only the template matters). Each case is a conversation in
OpenAI's shape (assistant tool calls with their arguments as a JSON string, tool messages with
tool_call_id) and the tools; transformers gets them as vLLM hands them over: each call's arguments parsed
into an object. The Rust test renders the same requests through Tessera's chat template and compares.
Needs transformers (no torch).
"""

import copy
import json
import pathlib

from transformers import PreTrainedTokenizerFast

root = pathlib.Path(__file__).resolve().parent.parent
template = (root / "testdata/tools/hermes_template.jinja").read_text()
tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "models/stories260K/tokenizer.json"))

weather = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                          "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}
clock = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone, ünïcode ✓.",
         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}

cases = [
    {"name": "tools offered, first turn", "tools": [weather, clock],
     "messages": [{"role": "user", "content": "What is the weather in Paris?"}]},
    {"name": "with a system message", "tools": [weather],
     "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]},
    {"name": "a call and its result", "tools": [weather, clock],
     "messages": [
         {"role": "user", "content": "Weather in Paris, and the time there?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}},
             {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{\"zone\": \"Europe/Paris\"}"}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
         {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
         {"role": "assistant", "content": "It is 21 °C and 14:05 in Paris."},
         {"role": "user", "content": "Thanks!"}]},
    {"name": "text before a call", "tools": [weather],
     "messages": [
         {"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": "Let me look.", "tool_calls": [
             {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
         {"role": "tool", "tool_call_id": "c", "content": "sunny"}]},
    {"name": "no tools", "tools": None,
     "messages": [{"role": "system", "content": "Hi."}, {"role": "user", "content": "Hello"}]},
]


def for_template(messages):
    """What a template sees, as vLLM (and Tessera) hand it over: each call's arguments as an object."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


for c in cases:
    c["rendered"] = tok.apply_chat_template(for_template(c["messages"]), tools=c["tools"], chat_template=template,
                                            tokenize=False, add_generation_prompt=True)

out = {"template": "hermes_template.jinja", "cases": cases}
(root / "testdata/tools/golden.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
print(f"{len(cases)} cases written")
