"""Tool calling against a running `tessera serve`, through the official OpenAI client.

Usage: tool_calls.py BASE_URL MODEL

The server runs a random model with the `<tool_call>` chat template of testdata/tools. Checked, streamed and
not:
- `tool_choice="required"` (one call: `parallel_tool_calls=false`) and a named function: every answer has
  `tool_calls` whose names are offered tools and whose arguments parse and validate (`jsonschema`) against
  the function's parameters; `finish_reason` is `tool_calls` (`stop` for a named function, as OpenAI's);
- `auto`: the model's own `<tool_call>` blocks (forced here with a `structured_outputs` regex, since a
  random model never writes one) come back as calls, the text around them as content;
- a conversation that carries earlier calls and their results is answered, and `/tokenize` counts its
  prompt (with the tools) as the chat endpoint does.
Exits non-zero, listing every failure.
"""

import json
import sys
import urllib.request

import jsonschema
import openai

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=120)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "book_table", "parameters": {
        "type": "object", "properties": {"guests": {"type": "integer", "minimum": 1, "maximum": 12},
                                         "names": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
                                         "window": {"type": "boolean"}},
        "required": ["guests", "names"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris, and book a table for two."}]


def ask(stream, **kw):
    """(content, [(id, name, arguments)], finish_reason) of one request's first choice."""
    args = dict(model=MODEL, messages=kw.pop("messages", MESSAGES), tools=kw.pop("tools", TOOLS), **{"max_tokens": 120, **kw})
    if not stream:
        c = client.chat.completions.create(**args).choices[0]
        calls = [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        return c.message.content, calls, c.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                if t.index not in calls:
                    # A call's first delta carries its id and name, as OpenAI streams them.
                    assert t.id and t.function.name, f"first delta of call {t.index} without id or name: {t}"
                    calls[t.index] = [t.id, t.function.name, ""]
                calls[t.index][2] += t.function.arguments or ""
    return content or None, [tuple(c) for _, c in sorted(calls.items())], finish


def check_calls(where, calls, names):
    problems = []
    if not calls:
        problems.append(f"{where}: no tool_calls")
    ids = [c[0] for c in calls]
    if len(set(ids)) != len(ids):
        problems.append(f"{where}: call ids repeat: {ids}")
    for _, name, arguments in calls:
        if name not in names:
            problems.append(f"{where}: call of {name!r}, not one of {names}")
            continue
        try:
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        except (ValueError, jsonschema.ValidationError) as e:
            problems.append(f"{where}: {name} arguments {arguments!r}: {str(e).splitlines()[0]}")
    return problems


failures = []
for stream in (False, True):
    for seed in range(6):
        # One call each: a random model given the choice keeps adding calls to the list until max_tokens
        # (lists of several calls are the parsers' unit tests).
        where = f"required, seed {seed}, stream={stream}"
        content, calls, finish = ask(stream, tool_choice="required", parallel_tool_calls=False, seed=seed)
        failures += check_calls(where, calls, list(SCHEMAS))
        if len(calls) != 1:
            failures.append(f"{where}: parallel_tool_calls=false but {len(calls)} calls")
        if finish != "tool_calls" or content:
            failures.append(f"{where}: finish_reason {finish}, content {content!r}")
        for name in SCHEMAS:
            where = f"named {name}, seed {seed}, stream={stream}"
            choice = {"type": "function", "function": {"name": name}}
            content, calls, finish = ask(stream, tool_choice=choice, seed=seed)
            failures += check_calls(where, calls, [name])
            if len(calls) != 1 or finish != "stop" or content:
                failures.append(f"{where}: {len(calls)} calls, finish_reason {finish}, content {content!r}")

    # auto: the model's own format, parsed out of its text.
    where = f"auto, stream={stream}"
    rx = 'Sure\\. <tool_call>\n\\{"name": "get_weather", "arguments": \\{"city": "[a-z]{1,8}", "unit": "c"\\}\\}\n</tool_call>'
    content, calls, finish = ask(stream, tool_choice="auto", seed=1, extra_body={"structured_outputs": {"regex": rx}})
    failures += check_calls(where, calls, ["get_weather"])
    if finish != "tool_calls" or (content or "").strip() != "Sure.":
        failures.append(f"{where}: finish_reason {finish}, content {content!r}")

    # A conversation with earlier calls and their results renders and is answered.
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\": 21}"},
    ]
    content, calls, finish = ask(stream, tool_choice="none", tools=TOOLS[:1], messages=history, seed=2, max_tokens=8)
    if calls or finish != "length" or not content:
        failures.append(f"history, stream={stream}: content {content!r}, calls {calls}, finish_reason {finish}")

# /tokenize renders messages with tools as the chat endpoint does: the same prompt length.
usage = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS[:1], tool_choice="none",
                                       max_tokens=1).usage
req = urllib.request.Request(BASE + "/tokenize", method="POST", headers={"content-type": "application/json"},
                             data=json.dumps({"model": MODEL, "messages": history, "tools": TOOLS[:1]}).encode())
counted = json.load(urllib.request.urlopen(req))["count"]
if counted != usage.prompt_tokens:
    failures.append(f"/tokenize counted {counted} tokens with tools, the chat request {usage.prompt_tokens}")

for f in failures:
    print(f)
print(f"{len(failures)} tool-call failures")
sys.exit(1 if failures else 0)
